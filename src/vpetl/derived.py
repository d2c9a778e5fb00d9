"""Classes vpetl derives from a model's own classes: made once, picklable, deep-copyable.

Where ``inject`` must change what a module computes (an MLP that also adds the adapter, an
attention that extends its keys), it swaps the instance's class for ``(Mixin, Base)``: the
mixin's methods run first and reach ``Base``'s through ``super()``; keys and Parameters stay.
Such a class is made at run time, so pickle could not find it by name; instead the classes
here pickle as the call that makes them, ``derived_class(Mixin, Base)`` (their metaclass,
:class:`DerivedType`, is registered with :mod:`copyreg`). Both arguments are importable (the
mixin lives in a vpetl module, the base in the model's library), so ``torch.save(model)`` /
``torch.load(..., weights_only=False)`` in a fresh process, ``multiprocessing`` spawn and the
injection record's undo log all rebuild the same class through the one cache here.
"""

from __future__ import annotations

import copyreg
from typing import Any

_CACHE: dict[tuple[type, type], type] = {}


class DerivedType(type):
    """Metaclass of the mixins and of the classes :func:`derived_class` makes (see module docs)."""


def _reduce_class(cls: type) -> Any:
    """A derived class as ``derived_class(mixin, base)``; a mixin by its importable name."""
    origin = vars(cls).get("__vpetl_origin__")
    return cls.__qualname__ if origin is None else (derived_class, origin)


_METACLASSES: dict[type, type] = {type: DerivedType}


def _metaclass_for(base: type) -> type:
    """:class:`DerivedType`, or one that also derives from ``base``'s own metaclass (e.g.
    ``abc.ABCMeta``), registered with :mod:`copyreg` like it."""
    meta = type(base)
    if meta not in _METACLASSES:
        if issubclass(meta, DerivedType):
            _METACLASSES[meta] = meta
        else:
            combined = _METACLASSES[meta] = DerivedType(f"Derived{meta.__name__}", (DerivedType, meta), {})
            copyreg.pickle(combined, _reduce_class)
    return _METACLASSES[meta]


copyreg.pickle(DerivedType, _reduce_class)


class Derived(metaclass=DerivedType):
    """Mixin base of every class :func:`derived_class` makes.

    ``class_prefix`` names the derived class (``<prefix><Base name>``); :meth:`derived_namespace`
    gives extra class attributes computed from the base (a pure function of it, so unpickling
    rebuilds the same class).
    """

    class_prefix = "Vpetl"

    @classmethod
    def derived_namespace(cls, base: type) -> dict[str, Any]:
        return {}

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: a mixin that :mod:`vpetl.scripting` covers
        overrides it; any other refuses with :class:`vpetl.ExportError`."""
        from .tracing import raise_not_scriptable

        raise_not_scriptable(self)


def derived_class(mixin: type[Derived], base: type) -> type:
    """``class <mixin.class_prefix><base.__name__>(mixin, base)``, made once per pair."""
    if not (isinstance(mixin, type) and issubclass(mixin, Derived)):
        raise TypeError(f"derived_class expects a vpetl.derived.Derived mixin; got {mixin!r}.")
    key = (mixin, base)
    cls = _CACHE.get(key)
    if cls is None:
        name = mixin.class_prefix + base.__name__
        namespace = {
            "__module__": mixin.__module__,
            "__qualname__": name,
            "__doc__": f"{base.__qualname__} adapted by vpetl ({mixin.__module__}.{mixin.__qualname__}).",
            "__vpetl_origin__": key,
            **mixin.derived_namespace(base),
        }
        cls = _CACHE[key] = _metaclass_for(base)(name, (mixin, base), namespace)
    return cls
