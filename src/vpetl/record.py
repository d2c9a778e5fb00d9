"""What ``inject`` changed in a model, as plain data, so it can be undone exactly.

The record lives on the model as ``model._vpetl`` (a plain attribute, not a submodule, so it
adds no state-dict keys). Undo steps hold module references, never closures: ``copy.deepcopy``
of an injected model then yields a record that points at the copy's modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .config import InjectConfig

RECORD_ATTR = "_vpetl"

# Injected models whose first-forward branch check (hooks on the root) is still pending.
AWAITING_FIRST_FORWARD: weakref.WeakSet = weakref.WeakSet()
_MISSING = object()


@dataclass
class ModuleSwap:
    """``parent.<name>`` was ``original`` before inject, ``new`` after."""

    parent: nn.Module
    name: str
    original: nn.Module
    new: nn.Module

    def undo(self) -> None:
        setattr(self.parent, self.name, self.original)

    def redo(self) -> None:
        setattr(self.parent, self.name, self.new)


@dataclass
class AddedModule:
    """``parent.<name>`` was added by inject."""

    parent: nn.Module
    name: str

    def undo(self) -> None:
        if self.name in self.parent._modules:
            del self.parent._modules[self.name]


@dataclass
class ClassSwap:
    """``module.__class__`` was ``original`` before inject, ``new`` after."""

    module: nn.Module
    original: type
    new: type

    def undo(self) -> None:
        self.module.__class__ = self.original

    def redo(self) -> None:
        self.module.__class__ = self.new


@dataclass
class AttrSet:
    """``obj.<name>`` was ``old`` (or absent) before inject, ``new`` after."""

    obj: Any
    name: str
    old: Any
    new: Any

    def undo(self) -> None:
        if self.old is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.old)

    def redo(self) -> None:
        setattr(self.obj, self.name, self.new)


@dataclass
class ForwardHook:
    """``hook`` was registered on ``module`` by inject: a forward pre-hook (``pre``) or a
    forward hook, with keyword arguments or not. ``hook`` should be a bound method of a branch
    module (not a closure), so ``copy.deepcopy`` of the model re-binds it to the copy's branch;
    the handle deep-copies along with the module's hook dicts."""

    module: nn.Module
    hook: Callable[..., Any]
    pre: bool
    with_kwargs: bool = False
    handle: RemovableHandle | None = None

    def undo(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def redo(self) -> None:
        if self.handle is None:
            register = self.module.register_forward_pre_hook if self.pre else self.module.register_forward_hook
            self.handle = register(self.hook, with_kwargs=self.with_kwargs)


STRUCTURAL = (ModuleSwap, ClassSwap, AttrSet, ForwardHook)  # what decides which code runs in forward


@dataclass
class RequiresGrad:
    """The ``requires_grad`` flags of every parameter before inject."""

    flags: list[tuple[nn.Parameter, bool]]

    def undo(self) -> None:
        for param, flag in self.flags:
            param.requires_grad_(flag)


@dataclass
class InjectionRecord:
    """The config, the branches by module path, the delta's parameter names, and the undo log."""

    config: InjectConfig
    branches: dict[str, nn.Module] = field(default_factory=dict)
    sites: list[Any] = field(default_factory=list)  # the AttentionSites that received branches
    delta_names: tuple[str, ...] = ()
    head_paths: tuple[str, ...] = ()
    undo_log: list[Any] = field(default_factory=list)
    hooks: list[tuple[str, int]] = field(default_factory=list)  # ("pre" | "post", hook id) on the root
    disabled: bool = False  # inside vpetl.disabled(model)
    tasks: Any = None  # a vpetl.tasks.TaskSet when the model carries named tasks

    def swap_module(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.undo_log.append(ModuleSwap(parent, name, getattr(parent, name), new))
        setattr(parent, name, new)

    def add_module(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        if hasattr(parent, name):
            raise AttributeError(f"{type(parent).__name__} already has an attribute {name!r}")
        self.undo_log.append(AddedModule(parent, name))
        parent.add_module(name, module)

    def swap_class(self, module: nn.Module, new_class: type) -> None:
        self.undo_log.append(ClassSwap(module, type(module), new_class))
        module.__class__ = new_class

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        self.undo_log.append(AttrSet(obj, name, getattr(obj, name, _MISSING), value))
        setattr(obj, name, value)

    def add_hook(self, module: nn.Module, hook: Callable[..., Any], *, pre: bool, with_kwargs: bool = False) -> None:
        """Register ``hook`` on ``module`` (a forward pre-hook if ``pre``), undoably."""
        entry = ForwardHook(module, hook, pre, with_kwargs)
        entry.redo()
        self.undo_log.append(entry)

    def remember_requires_grad(self, model: nn.Module) -> None:
        self.undo_log.append(RequiresGrad([(p, p.requires_grad) for p in model.parameters()]))

    def remove_hooks(self, model: nn.Module) -> None:
        AWAITING_FIRST_FORWARD.discard(model)
        for kind, hook_id in self.hooks:
            hooks = model._forward_pre_hooks if kind == "pre" else model._forward_hooks
            hooks.pop(hook_id, None)
        self.hooks.clear()

    def detach_structure(self) -> None:
        """Put the original modules, classes and attributes back, keeping the branches
        registered (``vpetl.disabled``); :meth:`attach_structure` reverses it."""
        for entry in reversed(self.undo_log):
            if isinstance(entry, STRUCTURAL):
                entry.undo()

    def attach_structure(self) -> None:
        for entry in self.undo_log:
            if isinstance(entry, STRUCTURAL):
                entry.redo()

    def undo(self, model: nn.Module | None = None) -> None:
        """Revert every change, newest first (``model``: the root, to remove its hooks)."""
        if model is not None:
            self.remove_hooks(model)
        while self.undo_log:
            self.undo_log.pop().undo()


def get_record(model: nn.Module) -> InjectionRecord | None:
    return model.__dict__.get(RECORD_ATTR)


def set_record(model: nn.Module, record: InjectionRecord | None) -> None:
    if record is None:
        model.__dict__.pop(RECORD_ATTR, None)
    else:
        model.__dict__[RECORD_ATTR] = record
