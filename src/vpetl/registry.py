"""The method table: every method is one file in :mod:`vpetl.methods` that defines a
:class:`Method` (its frozen, validated config) and registers it here with :func:`register`.

Everything else reads this table: the string presets of ``vpetl.inject`` and their option
validation (:mod:`vpetl.presets`), the CLI's ``--method`` choices, ``vpetl params --method all``,
``vpetl.summary``'s kinds, ``vpetl.merge``'s rules and the delta file's stored config.

A method entry is a frozen dataclass whose fields are its options. It says:

* ``name``: its key in ``vpetl.inject(model, name)`` and the CLI;
* ``kind``: its parameters' marker (``<path>.vpetl_<kind>.*``) and its row in ``vpetl.summary``;
* ``width_field``: the field ``d_bottle`` sets (its width or rank), or None;
* ``paper`` / ``formula``: where it comes from, and its parameter count;
* :meth:`Method.attach`: what it adds to a model, through the walker's :class:`~vpetl.inject.Injection`;
* :meth:`Method.merge`: how it folds exactly into the base weights (``mergeable``), if it does.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError, MergeError

if TYPE_CHECKING:
    from .inject import Injection
    from .record import InjectionRecord


class Method:
    """Base of every method entry (subclasses are ``@dataclass(frozen=True)``)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    width_field: ClassVar[str | None] = "d_bottle"
    adds_branches: ClassVar[bool] = True  # False: it only unfreezes base parameters
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = ""
    # merge before every other entry: it rewrites the base weights that the others' deltas are
    # added to outside its own transform (SSF scales the base op, LoRA adds after it)
    merge_first: ClassVar[bool] = False
    # names of methods that cannot share a model with this one (checked both ways)
    conflicts: ClassVar[frozenset[str]] = frozenset()

    def attach(self, injection: Injection) -> None:
        """Add this method's branches to the model (or choose base parameters to train)."""
        raise NotImplementedError

    def merge(self, record: InjectionRecord) -> None:
        """Fold this method's trained branches into the frozen base weights, in place."""
        raise MergeError(f"{self.name} cannot be merged into the base weights: {self.why_not_mergeable}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options ``inject`` accepts for this method: its fields, ``d_bottle`` for the width field."""
        names = [f.name for f in fields(cls)]
        if cls.width_field is not None:
            names = ["d_bottle" if n == cls.width_field else n for n in names]
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <field>: <JSON value>}``: the form stored in delta files."""
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):
            out[f.name] = _json_value(getattr(self, f.name))
        return out

    def describe(self) -> str:
        """``name(option=value, ...)`` with the options that differ from the defaults."""
        changed = [
            f"{f.name}={_json_value(getattr(self, f.name))!r}"
            for f in fields(self) if f.default is MISSING or getattr(self, f.name) != f.default
        ]
        return f"{self.name}({', '.join(changed)})"


def _json_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


REGISTRY: dict[str, type[Method]] = {}
BRANCH_MARKER = "vpetl_"  # every name vpetl adds starts with it: parameters are ``<path>.vpetl_<kind>.*``


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method entry to the table (its ``name`` must be new)."""
    if not cls.name or not cls.kind:
        raise TypeError(f"{cls.__name__} must set the class attributes name and kind")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def branch_kinds() -> tuple[str, ...]:
    """The kinds of the registered methods that add branches (their parameter markers), in
    registration order, each once."""
    from . import methods  # noqa: F401  (fills the table)

    return tuple(dict.fromkeys(cls.kind for cls in REGISTRY.values() if cls.adds_branches))


def method_class(name: str) -> type[Method]:
    """The registered entry class called ``name``."""
    from . import methods  # noqa: F401  (fills the table)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}.") from None


def entry_from_dict(data: Any) -> Method:
    """Inverse of :meth:`Method.to_dict`; unknown fields are an error (a newer vpetl wrote them)."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"a method entry must be a mapping with a 'name'; got {data!r}.")
    cls = method_class(data["name"])
    options = {k: v for k, v in data.items() if k != "name"}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"method {cls.name!r} has no options {unknown} (known: {sorted(known)}); the file was written by a "
            "newer vpetl. Upgrade vpetl."
        )
    return cls(**options)


def check_composition(entries: tuple[Method, ...]) -> None:
    """Raise for entries that cannot be combined: the same kind twice, or a declared conflict."""
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if a.kind == b.kind:
                raise ConfigError(
                    f"methods {a.describe()} and {b.describe()} both add '{a.kind}' parameters; give one entry "
                    "per method (widen or reposition it instead)."
                )
            if b.name in a.conflicts or a.name in b.conflicts:
                raise ConfigError(
                    f"methods {a.name!r} and {b.name!r} cannot be combined: "
                    f"{getattr(a, 'conflict_reason', '') or getattr(b, 'conflict_reason', '') or 'they change the same weights'}."
                )
