"""``InjectConfig``: the whole truth about an injection, stored (as JSON) in delta files.

An injection is a list of method entries (:mod:`vpetl.methods`, one file each) plus what every
method shares: whether the classification head trains, which kernel runs the fused branches,
and the dtype of the trained parameters. Branches of several entries on the same projection
sum (the paper's unified view); entries that cannot be combined raise naming both.

>>> InjectConfig(methods=(vpetl.SSF(), vpetl.PATT(d_bottle=64)))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import ConfigError
from .methods.adapter import Adapter, AdapterConfig, AdapterPlacement
from .methods.lora import LoRA, LoraConfig
from .methods.patt import PATT, PattConfig, PattVariant
from .methods.prefix import Prefix, PrefixConfig
from .methods.tune import Tune, TunePosition, normalize_tune_positions
from .methods.vpt import VPT, PromptConfig
from .options import POSITION_LETTERS, Activation, BranchDtype, Kernel, enum_value, frozen_set, normalize_positions
from .registry import Method, check_composition, entry_from_dict

M = TypeVar("M", bound=Method)

__all__ = [
    "PATT",
    "POSITION_LETTERS",
    "VPT",
    "Activation",
    "Adapter",
    "AdapterConfig",
    "AdapterPlacement",
    "BranchDtype",
    "InjectConfig",
    "Kernel",
    "LoRA",
    "LoraConfig",
    "PattConfig",
    "PattVariant",
    "Prefix",
    "PrefixConfig",
    "PromptConfig",
    "Tune",
    "TunePosition",
    "normalize_positions",
    "normalize_tune_positions",
]


@dataclass(frozen=True)
class InjectConfig:
    """Everything ``inject`` does: the method entries, whether the head trains, which kernel.

    ``method`` is a label (the preset's name, or "custom"); ``methods`` the entries, attached
    in order.
    """

    methods: tuple[Method, ...] = ()
    method: str = "custom"
    train_head: bool = True
    kernel: Kernel = Kernel.AUTO
    branch_dtype: BranchDtype = BranchDtype.FOLLOW

    def __post_init__(self) -> None:
        entries = self.methods
        if isinstance(entries, Method):
            entries = (entries,)
        if not isinstance(entries, Iterable) or isinstance(entries, (str, bytes)):
            raise ConfigError(f"InjectConfig.methods must be a list of method entries (e.g. [vpetl.PATT()]); got {entries!r}.")
        entries = tuple(entries)
        bad = [e for e in entries if not isinstance(e, Method)]
        if bad:
            raise ConfigError(
                f"InjectConfig.methods must hold method entries such as vpetl.PATT(d_bottle=64) or vpetl.SSF(); "
                f"got {bad[0]!r} ({type(bad[0]).__name__}). For a method by name use vpetl.preset(name)."
            )
        check_composition(entries)
        frozen_set(self, "methods", entries)
        if not isinstance(self.method, str):
            raise ConfigError(f"InjectConfig.method must be a string label; got {self.method!r}.")
        if not isinstance(self.train_head, bool):
            raise ConfigError(f"train_head must be True or False; got {self.train_head!r}.")
        frozen_set(self, "kernel", enum_value(Kernel, self.kernel, "kernel"))
        frozen_set(self, "branch_dtype", enum_value(BranchDtype, self.branch_dtype, "branch_dtype"))

    def find(self, cls: type[M]) -> M | None:
        """The entry of class ``cls``, or None."""
        return next((e for e in self.methods if isinstance(e, cls)), None)

    # vpetl 0.1.0's per-method fields, read-only: the entry of that method or None (False, ()).
    patt = property(lambda self: self.find(PATT))
    adapter = property(lambda self: self.find(Adapter))
    lora = property(lambda self: self.find(LoRA))
    prefix = property(lambda self: self.find(Prefix))
    prompt = property(lambda self: self.find(VPT))
    tune = property(lambda self: getattr(self.find(Tune), "positions", ()))
    train_biases = property(lambda self: any(e.name == "bitfit" for e in self.methods))
    train_all = property(lambda self: any(e.name == "full" for e in self.methods))

    @property
    def has_branches(self) -> bool:
        return any(e.adds_branches for e in self.methods)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the form stored in delta files (format 2)."""
        return {
            "method": self.method,
            "methods": [e.to_dict() for e in self.methods],
            "train_head": self.train_head,
            "kernel": self.kernel.value,
            "branch_dtype": self.branch_dtype.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InjectConfig:
        """Inverse of ``to_dict``; also reads the layout vpetl 0.1.0 wrote (one field per method)."""
        if not isinstance(data, dict):
            raise ConfigError(f"an injection config must be a mapping; got {data!r}.")
        if "methods" not in data:
            data = _from_format_1(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"injection config has unknown fields {unknown}; it was written by a newer vpetl. Upgrade vpetl."
            )
        kwargs = dict(data)
        if not isinstance(kwargs["methods"], list):
            raise ConfigError(f"injection config field 'methods' must be a list; got {kwargs['methods']!r}.")
        kwargs["methods"] = tuple(entry_from_dict(e) for e in kwargs["methods"])
        return cls(**kwargs)


# vpetl 0.1.0 stored one optional field per method; this maps them onto entries, in the order
# that version attached them.
_FORMAT_1_ENTRIES: dict[str, str] = {"prefix": "prefix", "patt": "patt", "lora": "lora", "adapter": "adapter",
                                     "prompt": "vpt"}


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k in ("method", "train_head", "kernel", "branch_dtype")}
    entries: list[dict[str, Any]] = []
    for key, name in _FORMAT_1_ENTRIES.items():
        value = data.get(key)
        if value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"injection config field {key!r} must be a mapping; got {value!r}.")
            entries.append({"name": name, **value})
    if data.get("tune"):
        entries.append({"name": "tune", "positions": list(data["tune"])})
    if data.get("train_biases"):
        entries.append({"name": "bitfit"})
    if data.get("train_all"):
        entries.append({"name": "full"})
    legacy = {"patt", "adapter", "lora", "prefix", "prompt", "tune", "train_biases", "train_all"}
    unknown = sorted(set(data) - legacy - set(out))
    if unknown:
        raise ConfigError(
            f"injection config has unknown fields {unknown}; it was written by a newer vpetl. Upgrade vpetl."
        )
    out["methods"] = entries
    return out
