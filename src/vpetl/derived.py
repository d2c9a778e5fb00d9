"""Classes vpetl derives from a model's own classes: made once, picklable, deep-copyable.

Where ``inject`` must change what a module computes (an MLP that also adds the adapter, an
attention that extends its keys), it swaps the instance's class for ``(Mixin, Base)``: the
mixin's methods run first and reach ``Base``'s through ``super()``; keys and Parameters stay.
Such a class is made at run time, so pickle cannot find it by name. :class:`Derived` instances
therefore pickle as ``new_instance(Mixin, Base)`` plus their state: both classes are importable
(the mixin lives in a vpetl module, the base in the model's library), and unpickling in a fresh
process derives the same class again through the one cache here. ``torch.save(model)`` /
``torch.load(..., weights_only=False)``, ``copy.deepcopy`` and ``multiprocessing`` spawn all go
through that path.
"""

from __future__ import annotations

from typing import Any

_CACHE: dict[tuple[type, type], type] = {}


class Derived:
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

    def __reduce_ex__(self, protocol: int):
        mixin, base = type(self).__vpetl_origin__
        reduced = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (cls,), state, ...)
        return (new_instance, (mixin, base), *reduced[2:])


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
        cls = _CACHE[key] = type(name, (mixin, base), namespace)
    return cls


def is_derived(cls: type) -> bool:
    """True for a class made by :func:`derived_class`."""
    return "__vpetl_origin__" in vars(cls)


def new_instance(mixin: type[Derived], base: type) -> Any:
    """An empty instance of ``derived_class(mixin, base)`` for pickle to fill with its state."""
    cls = derived_class(mixin, base)
    return cls.__new__(cls)
