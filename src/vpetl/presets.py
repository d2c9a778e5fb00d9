"""The string presets of ``vpetl.inject``: a name and a few knobs -> an ``InjectConfig``.

Every registered method (:mod:`vpetl.methods`) is a preset of itself: ``inject(model, "ssf")``
is ``inject(model, [vpetl.SSF()])`` + head, and its options are its config's fields (``d_bottle``
sets its width / rank field). Two presets combine entries:

============  ===============================================================  =========
preset        entries (+ the head)                                             d_bottle
============  ===============================================================  =========
``bapat``     ``PATT(r, s=0.8)`` + ``Adapter(64, s=0.1)`` (V-PETL's BAPAT)      128 (PATT)
``linear``    none: the head only ("tune FC", linear probe)                    --
============  ===============================================================  =========

An option applies to the presets whose entries have that field (``OPTIONS``); passing it to
another is an error rather than silently ignored. In ``bapat`` every option but ``placement``
shapes the PATT entry; the adapter keeps the paper's 64 / 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import methods  # noqa: F401  (registers every method)
from .config import InjectConfig
from .errors import ConfigError
from .options import Kernel
from .registry import REGISTRY, Method, method_class


@dataclass(frozen=True)
class Preset:
    """A named list of entry classes; options go to the first entry that has the field."""

    name: str
    entries: tuple[type[Method], ...]
    summary: str = ""


_ORDER = ("patt", "adapter", "bapat", "lora", "prefix", "vpt", "tune", "bitfit", "linear", "full")


def _presets() -> dict[str, Preset]:
    out = {name: Preset(name, (cls,), cls.paper) for name, cls in REGISTRY.items()}
    out["bapat"] = Preset("bapat", (method_class("patt"), method_class("adapter")),
                          "V-PETL's BAPAT: PATT + AdaptFormer-64 (s=0.1)")
    out["linear"] = Preset("linear", (), "the head only (linear probe, 'tune FC')")
    first = [n for n in _ORDER if n in out]
    return {n: out[n] for n in first + sorted(set(out) - set(first))}


PRESETS: dict[str, Preset] = _presets()
METHODS: tuple[str, ...] = tuple(PRESETS)


def _applies(option: str, entry: type[Method]) -> bool:
    return option in entry.option_names()


_ENTRY_OPTIONS = sorted({o for cls in REGISTRY.values() for o in cls.option_names()})
# option -> the presets it applies to
OPTIONS: dict[str, tuple[str, ...]] = {
    **{o: tuple(n for n, p in PRESETS.items() if any(_applies(o, e) for e in p.entries)) for o in _ENTRY_OPTIONS},
    "branch_dtype": tuple(n for n, p in PRESETS.items() if any(e.adds_branches for e in p.entries)),
}


def preset(
    method: str,
    *,
    train_head: bool = True,
    kernel: Kernel | str = Kernel.AUTO,
    branch_dtype: Any = None,
    **options: Any,
) -> InjectConfig:
    """Map a preset name and its options onto an ``InjectConfig`` (paper defaults where ``None``).

    ``positions`` is a string of letters from "qkv" for patt/bapat/lora, and one or more
    :class:`~vpetl.TunePosition` (or their names, e.g. ``["attn_qkv", "mlp_fc1"]``) for tune.
    ``branch_dtype="float32"`` keeps the trained parameters in fp32 when the base runs in
    bf16/fp16.
    """
    if not isinstance(method, str) or method not in PRESETS:
        raise ConfigError(f"unknown method {method!r}; accepted: {', '.join(METHODS)} (or pass an InjectConfig).")
    if options.get("zero_init") is False:
        options["zero_init"] = None  # "no zero init" is every method's default
    given = {k: v for k, v in options.items() if v is not None}
    if branch_dtype is not None:
        given["branch_dtype"] = branch_dtype
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; accepted: {', '.join(sorted(OPTIONS))}.")
    for name, value in given.items():
        if method not in OPTIONS[name]:
            raise ConfigError(
                f"option {name}={value!r} does not apply to method {method!r}; it applies to "
                f"{', '.join(OPTIONS[name])}. Leave it out (None)."
            )
    common = dict(method=method, train_head=train_head, kernel=kernel)
    if "branch_dtype" in given:
        common["branch_dtype"] = given.pop("branch_dtype")
    chosen = PRESETS[method].entries
    per_entry: list[dict[str, Any]] = [{} for _ in chosen]
    for name, value in given.items():
        index = next(i for i, e in enumerate(chosen) if _applies(name, e))
        field = chosen[index].width_field if name == "d_bottle" else name
        per_entry[index][field] = value
    entries = tuple(cls(**kwargs) for cls, kwargs in zip(chosen, per_entry))
    return InjectConfig(methods=entries, **common)

