"""The walker: find the sites, let every method entry attach its branches, freeze the base.

``inject`` works in place and returns the same model. It changes no base state-dict key:
projections are replaced by modules that adopt their Parameters, MLPs and attentions get a
derived class (:mod:`vpetl.derived`), and new parameters are named ``<path>.vpetl_<kind>.*``
(``<attention>.vpetl_patt.*``, ``<attention>.vpetl_lora.<p>.*``, ``<block>.vpetl_adapter.*``,
...). Every change is logged in the injection record so ``vpetl.unload`` can revert it exactly.

A method entry (:mod:`vpetl.methods`) attaches itself through :class:`Injection`, which owns
the sites, registration, placement and wiring; branches of several entries on the same
projection are wired together and sum.

A branch that forward never reaches trains nothing, so it is an error: with
``example_input`` the check runs at once; otherwise on the model's first forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import branches as branch_protocol
from .blocks import Block, block_path_of, find_blocks
from .branches import Branch
from .config import InjectConfig
from .derived import derived_class
from .errors import ConfigError, InjectionError, format_names
from .handlers.base import ProjectionSpec
from .handlers.mlp import MlpSite, locate_mlp
from .handlers.sites import AttentionSite, find_attention, module_census, why_unhandled
from .heads import find_head_paths
from .kernels import triton_available
from .options import BranchDtype, Kernel
from .presets import OPTIONS, preset
from .projection import BranchedLinear
from .record import AWAITING_FIRST_FORWARD, InjectionRecord, get_record, set_record
from .registry import Method


def inject(
    model: nn.Module,
    method: str | InjectConfig | Method | Iterable[Method] = "bapat",
    *,
    d_bottle: int | None = None,
    scale: float | None = None,
    positions: Any = None,
    train_head: bool = True,
    zero_init: bool | None = None,
    kernel: Kernel | str = "auto",
    strict: bool = True,
    example_input: Any = None,
    **options: Any,
) -> nn.Module:
    """Add ``method``'s side branches to ``model`` in place, freeze the rest, return ``model``.

    Args:
        method: a method or preset name (``vpetl.METHODS``: "bapat", "patt", "adapter", "lora",
            "ssf", ...), one method entry (``vpetl.SSF()``), a list of entries whose branches
            combine (``[vpetl.SSF(), vpetl.PATT(d_bottle=64)]``), or an ``InjectConfig``.
        d_bottle: the width knob (bottleneck width / rank) of a named method; None is its
            paper default (patt/bapat/prefix 128, adapter 64, lora 16, ...).
        scale: the branch scale ``s`` (PATT 0.8, adapter 0.1, LoRA 1.0 by default).
        positions: letters from "qkv" that PATT (default "kv") or LoRA (default "qv") adapt;
            for "tune", the Table 1 positions to unfreeze (e.g. ``["attn_qkv", "norm2"]``).
        train_head: also train the classification head, if the model has one.
        zero_init: zero-initialise PATT's up-projection (the model is unchanged at step 0).
        kernel: "auto", "torch" or "triton" implementation of the fused projections.
        strict: raise (True) or warn (False) when an attention module cannot be adapted.
        example_input: a model input (tensor or tuple of args) to check at once that every
            branch is called; without it the check runs on the first forward.
        **options: the named method's other options (its config's fields, see
            :func:`vpetl.preset`), and ``branch_dtype``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects a torch.nn.Module; got {type(model).__name__}.")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown inject option(s) {unknown}; accepted: {', '.join(sorted(OPTIONS))}, train_head, kernel, "
            "strict, example_input."
        )
    config = _resolve_config(
        method, dict(d_bottle=d_bottle, scale=scale, positions=positions, zero_init=zero_init, **options),
        train_head, kernel,
    )
    if get_record(model) is not None:
        raise InjectionError(
            f"this model is already injected (method {get_record(model).config.method!r}); "
            "call vpetl.unload(model) first to inject again."
        )
    if any(isinstance(m, BranchedLinear) for m in model.modules()):
        raise InjectionError("part of this model is already injected by vpetl; unload it first.")
    if config.kernel is Kernel.TRITON and not triton_available():
        raise ConfigError(
            "kernel='triton' needs the Triton kernels, which cannot run here (Triton not importable or no "
            "CUDA device; set TRITON_INTERPRET=1 to run them on the CPU). Use kernel='auto' or 'torch'."
        )

    record = InjectionRecord(config)
    injection = Injection(model, config, record, strict)
    try:
        for entry in config.methods:
            entry.attach(injection)
        injection.wire()
        _set_trainable(model, config, record, injection.trained)
    except BaseException:
        record.undo()
        raise
    set_record(model, record)
    if record.branches:
        if example_input is not None:
            verify(model, example_input)
        else:
            _install_first_forward_check(model, record)
    return model


def _resolve_config(method: Any, options: dict[str, Any], train_head: bool, kernel: Any) -> InjectConfig:
    if isinstance(method, str):
        return preset(method, train_head=train_head, kernel=kernel, **options)
    clash = [k for k, v in options.items() if v is not None]
    if isinstance(method, InjectConfig):
        if clash or train_head is not True or kernel != "auto":
            raise ConfigError(
                "pass either an InjectConfig or keyword options, not both; "
                f"got an InjectConfig and {clash or 'train_head/kernel'}."
            )
        return method
    entries = (method,) if isinstance(method, Method) else method
    if not isinstance(entries, Iterable) or isinstance(entries, (bytes, dict)):
        raise ConfigError(
            f"method must be a name (one of vpetl.METHODS), a method entry such as vpetl.PATT(), a list of "
            f"entries, or an InjectConfig; got {type(method).__name__}."
        )
    if clash:
        raise ConfigError(
            f"options {clash} go into the method entries themselves when you pass entries "
            "(e.g. vpetl.PATT(d_bottle=64, scale=0.5)); only train_head, kernel and branch_dtype are accepted here."
        )
    entries = tuple(entries)
    label = "+".join(e.name for e in entries if isinstance(e, Method)) or "linear"
    return InjectConfig(methods=entries, method=label, train_head=train_head, kernel=kernel,
                        **({"branch_dtype": options["branch_dtype"]} if options.get("branch_dtype") else {}))


class Injection:
    """One injection in progress: what a method entry's ``attach`` works through.

    It finds the sites once (attention modules, the MLP beside each), registers branches under
    their names, places them on the base's device and dtype, and at the end wires every
    projection's branches together, so entries that adapt the same projection sum.
    """

    def __init__(self, model: nn.Module, config: InjectConfig, record: InjectionRecord, strict: bool) -> None:
        self.model, self.config, self.record, self.strict = model, config, record, strict
        self.kernel: Kernel = config.kernel
        self.trained: list[nn.Parameter] = []  # base parameters entries unfreeze
        self._sites: list[AttentionSite] | None = None
        self._specs: dict[str, ProjectionSpec] = {}
        self._mlp_sites: list[MlpSite] | None = None
        self._blocks: list[Block] | None = None
        self._projection: dict[str, list[Branch]] = {}
        self._extra_keys: dict[str, list[Branch]] = {}

    # ------------------------------------------------------------------ sites
    def attention_sites(self) -> list[AttentionSite]:
        """Every attention module a handler adapts (an error, or a warning with ``strict=False``,
        for attention-like modules none can; an error when there is none at all)."""
        if self._sites is None:
            self._sites = _find_sites(self.model, self.strict)
        return self._sites

    def projection_spec(self, site: AttentionSite, positions: str, method: str) -> ProjectionSpec:
        """The handler's description of ``site``'s q/k/v projections; ``positions`` must exist."""
        spec = self._specs.get(site.path)
        if spec is None:
            try:
                spec = self._specs[site.path] = site.handler.spec(site.module)
            except InjectionError as error:
                raise InjectionError(f"{site.path or '<root>'}: {error}") from error
        missing = [c for c in positions if c not in spec.widths]
        if missing:
            raise InjectionError(
                f"{site.path} ({type(site.module).__name__}) has no projection for {method} positions {missing}; "
                f"it has {''.join(spec.widths)}. Choose positions from those."
            )
        return spec

    def mlp_sites(self) -> list[MlpSite]:
        """The MLP of every block that holds an attention site (each once)."""
        if self._mlp_sites is None:
            self._mlp_sites, missing, seen = [], [], set()
            for site in self.attention_sites():
                mlp = locate_mlp(self.model, site.path)
                if mlp is None:
                    if _has_mlp_like_child(self.model, site.path):
                        missing.append(f"{site.path} ({type(site.module).__name__})")
                elif mlp.path not in seen:
                    seen.add(mlp.path)
                    self._mlp_sites.append(mlp)
            if missing:
                message = (
                    f"found no MLP beside {len(missing)} attention module(s): {', '.join(missing[:8])}; the adapter "
                    "sits beside a block's MLP: a child named mlp/ffn/feed_forward made of nn.Linear layers (a "
                    "convolutional MLP does not qualify), or an HF intermediate/output pair. Pass strict=False "
                    "to skip these blocks."
                )
                if self.strict or not self._mlp_sites:
                    raise InjectionError(message)
                warnings.warn(message, stacklevel=5)
            if not self._mlp_sites:
                raise InjectionError(
                    f"no block of this {type(self.model).__name__} has an MLP (a child named mlp/ffn/feed_forward "
                    "made of nn.Linear layers, an HF intermediate/output pair, or linear1/linear2), so the adapter "
                    "has nowhere to go. Use a method that adapts the attention (patt, lora, prefix)."
                )
        return self._mlp_sites

    # ------------------------------------------------------------------ adding
    def place(self, branch: Branch, like: torch.Tensor) -> Branch:
        """``branch`` on ``like``'s device, in its dtype (or float32 per ``branch_dtype``)."""
        return branch.place(like.device, like.dtype, self.config.branch_dtype is BranchDtype.FLOAT32)

    def add_branch(self, parent_path: str, name: str, branch: Branch) -> str:
        """Register ``branch`` as ``<parent_path>.<name>`` (undoably); returns its path."""
        self.record.add_module(self.model.get_submodule(parent_path), name, branch)
        return self.adopt(_join(parent_path, name), branch)

    def adopt(self, path: str, branch: Branch) -> str:
        """Count ``branch`` (already registered at ``path``) as one of the injection's branches."""
        if path in self.record.branches:
            raise InjectionError(f"two method entries add a branch at {path}; combine them differently.")
        self.record.branches[path] = branch
        return path

    def add_projection_branch(self, site: AttentionSite, name: str, branch: Branch) -> None:
        """Register ``branch`` on the attention and have its q/k/v projections add it."""
        spec = self._specs[site.path]
        self.add_branch(site.path, name, self.place(branch, torch.empty(0, device=spec.device, dtype=spec.dtype)))
        self._projection.setdefault(site.path, []).append(branch)

    def add_extra_keys(self, site: AttentionSite, name: str, branch: Branch) -> None:
        """Register ``branch`` on the attention and have it extend K and V along the token axis."""
        spec = self._specs[site.path]
        self.add_branch(site.path, name, self.place(branch, torch.empty(0, device=spec.device, dtype=spec.dtype)))
        self._extra_keys.setdefault(site.path, []).append(branch)

    def add_mlp_branch(self, site: MlpSite, branch: Branch) -> None:
        """Register ``branch`` on the block as ``vpetl_adapter``; the MLP's forward adds it."""
        site.wire(branch, self.record)
        self.adopt(_join(site.path, "vpetl_adapter"), branch)

    def blocks(self) -> list[Block]:
        """The transformer blocks holding the attention sites, with their modules by role
        (:mod:`vpetl.blocks`)."""
        if self._blocks is None:
            self._blocks = find_blocks(self.model, self.attention_sites())
        return self._blocks

    def derive(self, path: str, mixin: type, attr: str, branch: Branch) -> None:
        """Give the module at ``path`` the class ``derived_class(mixin, type(module))`` and the
        plain attribute ``attr = (branch,)`` (no new keys), undoably: the mixin's methods run
        first and reach ``branch`` through ``self.<attr>[0]``. Several methods may derive the
        same module; their mixins stack in attach order."""
        module = self.model.get_submodule(path)
        if hasattr(module, attr):
            raise InjectionError(f"{path} ({type(module).__name__}) already has {attr}; one entry per method.")
        self.record.set_attr(module, attr, (branch,))
        self.record.swap_class(module, derived_class(mixin, type(module)))

    def train(self, params: Iterable[nn.Parameter]) -> None:
        """Unfreeze these base parameters (tune, bitfit, full)."""
        self.trained.extend(params)

    # ------------------------------------------------------------------ wiring
    def wire(self) -> None:
        """Hand each attention's branches to its handler, all entries' together."""
        for site in self._sites or []:
            projection, extra = self._projection.get(site.path), self._extra_keys.get(site.path)
            if not (projection or extra):
                continue
            try:
                if projection:
                    site.handler.wire(site.module, projection, self.record)
                if extra:
                    site.handler.wire_extra_keys(site.module, extra, self.record)
            except InjectionError as error:
                raise InjectionError(f"{site.path or '<root>'}: {error}") from error
            self.record.sites.append(site)


_MLP_LIKE = ("mlp", "ffn", "feed_forward", "intermediate", "linear1")


def _has_mlp_like_child(model: nn.Module, attention_path: str) -> bool:
    """Whether the block holding this attention has something named like an MLP. A block with
    attention but no MLP at all (timm CrossViT's fusion blocks) simply gets no adapter; one
    whose MLP vpetl cannot read (a convolutional MLP) is reported."""
    block_path = block_path_of(model, attention_path)
    if block_path is None:
        block_path = attention_path.rpartition(".")[0]
    block = model.get_submodule(block_path)
    if block_path == attention_path:
        return True  # the site is a whole layer (nn.TransformerEncoderLayer): its feed-forward is inside
    return any(any(key in name.lower() for key in _MLP_LIKE) for name in block._modules)


def _find_sites(model: nn.Module, strict: bool) -> list[AttentionSite]:
    sites, unhandled = find_attention(model)
    if unhandled:
        listing = "; ".join(f"{p or '<root>'} ({type(m).__name__}): {why_unhandled(m)}" for p, m in unhandled[:8])
        message = (
            f"vpetl cannot adapt {len(unhandled)} attention module(s): {listing}. Pass strict=False to "
            "adapt the rest and leave these frozen, or open an issue with the model name."
        )
        if strict:
            raise InjectionError(message)
        warnings.warn(message, stacklevel=5)
    if not sites:
        raise InjectionError(
            f"found no attention module in {type(model).__name__} (it contains {module_census(model)}). "
            "vpetl adapts attention with a fused qkv nn.Linear, separate q/k/v (or q + kv) nn.Linear "
            "children, nn.MultiheadAttention and torchvision window attention. For a model without "
            "attention use method 'linear', 'bitfit' or 'full'."
        )
    return sites


def _set_trainable(model: nn.Module, config: InjectConfig, record: InjectionRecord, trained: list[nn.Parameter]) -> None:
    record.remember_requires_grad(model)
    record.head_paths = find_head_paths(model)
    chosen = {id(p) for b in record.branches.values() for p in b.parameters()} | {id(p) for p in trained}
    head_prefixes = tuple(p + "." for p in record.head_paths) if config.train_head else ()
    names = []
    for name, param in model.named_parameters():
        train = id(param) in chosen or bool(head_prefixes) and name.startswith(head_prefixes)
        param.requires_grad_(train)
        if train:
            names.append(name)
    record.delta_names = tuple(names)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@contextmanager
def record_calls(model: nn.Module) -> Iterator[set[int]]:
    """Within the block, every branch of ``model`` logs its id when forward reaches it."""
    _require_record(model)
    log: set[int] = set()
    outer = branch_protocol._CALL_LOG[0]
    branch_protocol._CALL_LOG[0] = log
    try:
        yield log
    finally:
        branch_protocol._CALL_LOG[0] = outer


def uncalled_branches(model: nn.Module, log: set[int]) -> list[str]:
    record = _require_record(model)
    return [path for path, branch in record.branches.items() if id(branch) not in log]


def verify(model: nn.Module, example_input: Any) -> None:
    """Run one forward (no grad) and raise if any branch was not called."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    _require_record(model).remove_hooks(model)  # this check replaces the pending first-forward one
    with torch.no_grad(), record_calls(model) as log:
        model(*args)
    _raise_if_uncalled(model, log)


def _raise_if_uncalled(model: nn.Module, log: set[int]) -> None:
    missing = uncalled_branches(model, log)
    if missing:
        raise InjectionError(
            f"{len(missing)} vpetl branch(es) were never called in forward, so they would train nothing: "
            f"{format_names(missing, 8)}. The module's forward bypasses the adapted projection (for "
            "example it reads .weight itself). Please report the model class; vpetl.unload(model) "
            "restores the original."
        )


def _install_first_forward_check(model: nn.Module, record: InjectionRecord) -> None:
    pre = model.register_forward_pre_hook(_start_check)
    post = model.register_forward_hook(_finish_check)
    record.hooks.extend([("pre", pre.id), ("post", post.id)])
    AWAITING_FIRST_FORWARD.add(model)


def _start_check(module: nn.Module, args: Any) -> None:
    if get_record(module) is not None:
        record_pending_calls(module)


def _finish_check(module: nn.Module, args: Any, output: Any) -> None:
    record = get_record(module)
    if record is None or not record.branches or record.disabled:
        return  # a forward inside vpetl.disabled() calls no branch by design: check the next one
    log = _PENDING.pop(id(module), None)
    if log is not None and branch_protocol._CALL_LOG[0] is log:
        branch_protocol._CALL_LOG[0] = None
    record.remove_hooks(module)
    if log is not None:
        _raise_if_uncalled(module, log)


# root id -> the call log of its pending first-forward check (set by the pre-hook)
_PENDING: dict[int, set[int]] = {}


def record_pending_calls(module: nn.Module) -> None:
    log = branch_protocol._CALL_LOG[0]
    if log is None:
        log = branch_protocol._CALL_LOG[0] = set()
    _PENDING[id(module)] = log


def _require_record(model: nn.Module) -> InjectionRecord:
    record = get_record(model)
    if record is None:
        raise InjectionError(f"this {type(model).__name__} is not injected; call vpetl.inject(model, ...) first.")
    return record


def branches_of(model: nn.Module) -> dict[str, Branch]:
    """The injected branches by parameter-name prefix."""
    return dict(_require_record(model).branches)
