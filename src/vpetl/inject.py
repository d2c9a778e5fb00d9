"""The walker: find every attention and MLP, add the configured branches, freeze the base.

``inject`` works in place and returns the same model. It changes no base state-dict key:
projections are replaced by modules that adopt their Parameters, MLPs get a subclass, and
new parameters are named ``<attention>.vpetl_patt.*``, ``<attention>.vpetl_lora.<p>.*`` and
``<mlp>.vpetl_adapter.*``. Every change is logged so ``vpetl.unload`` can revert it exactly.

A branch that forward never reaches trains nothing, so it is an error: with
``example_input`` the check runs at once; otherwise on the model's first forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .branches import AdapterBranch, Branch, LoraBranch, PattBranch
from .config import BranchDtype, InjectConfig, Kernel, PattVariant
from .errors import ConfigError, InjectionError, format_names
from .handlers import HANDLERS, AttentionHandler
from .handlers.fused_qkv import unsupported_reason
from .handlers.mlp import locate_mlp
from .heads import find_head_paths
from .kernels import triton_available
from .presets import OPTIONS, preset
from .projection import BranchedLinear
from .record import AWAITING_FIRST_FORWARD, InjectionRecord, get_record, set_record
from .token_branches import PrefixBranch

PROJECTION_CHILD_NAMES = frozenset(
    {"qkv", "kv", "q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj", "in_proj", "wq", "wk", "wv"}
)


@dataclass
class AttentionSite:
    path: str
    module: nn.Module
    handler: AttentionHandler


def inject(
    model: nn.Module,
    method: str | InjectConfig = "bapat",
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
        method: "patt", "adapter", "bapat", "lora", "prefix", "vpt", "tune", "bitfit",
            "linear", "full", or an ``InjectConfig`` for full control.
        d_bottle: the width knob (PATT / adapter / prefix bottleneck, LoRA rank); None is the
            paper default (patt/bapat/prefix 128, adapter 64, lora 16).
        scale: the branch scale ``s`` (PATT 0.8, adapter 0.1, LoRA 1.0 by default).
        positions: letters from "qkv" that PATT (default "kv") or LoRA (default "qv") adapt;
            for "tune", the Table 1 positions to unfreeze (e.g. ``["attn_qkv", "norm2"]``).
        train_head: also train the classification head, if the model has one.
        zero_init: zero-initialise PATT's up-projection (the model is unchanged at step 0).
        kernel: "auto", "torch" or "triton" implementation of the fused projections.
        strict: raise (True) or warn (False) when an attention module cannot be adapted.
        example_input: a model input (tensor or tuple of args) to check at once that every
            branch is called; without it the check runs on the first forward.
        **options: method options of :func:`vpetl.preset`: ``length`` (prefix, vpt), ``deep``
            (vpt), ``variant`` / ``tokens`` / ``learnable_scale`` (PATT), ``activation``,
            ``placement`` (adapter: "parallel" or "sequential").
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
    try:
        sites = _find_sites(model, strict) if (config.has_branches or config.tune) else []
        if config.has_branches:
            _add_branches(model, sites, config, record, strict)
        _set_trainable(model, config, record, sites)
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
    if isinstance(method, InjectConfig):
        clash = [k for k, v in options.items() if v is not None]
        if clash or train_head is not True or kernel != "auto":
            raise ConfigError(
                "pass either an InjectConfig or keyword options, not both; "
                f"got an InjectConfig and {clash or 'train_head/kernel'}."
            )
        return method
    return preset(method, train_head=train_head, kernel=kernel, **options)


def find_attention(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, nn.Module]]]:
    """Attention modules a handler adapts, and attention-like modules none can (unhandled)."""
    sites: list[AttentionSite] = []
    suspects: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(s.path == "" or path.startswith(s.path + ".") for s in sites):
            continue  # inside a site already claimed (the root itself may be one)
        handler = next((h for h in HANDLERS if h.match(module)), None)
        if handler is not None:
            sites.append(AttentionSite(path, module, handler))
        elif _looks_like_attention(module):
            suspects.append((path, module))
    site_paths = [s.path for s in sites]
    unhandled = [
        (p, m) for p, m in suspects
        if not any(s.startswith(p + ".") or p.startswith(s + ".") for s in site_paths)
    ]
    return sites, unhandled


def _module_census(model: nn.Module, limit: int = 6) -> str:
    """"12 Linear, 4 LayerNorm, ..." for error messages: what the walker did find."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if module is not model:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if not counts:
        return "no submodules"
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{n} {name}" for name, n in ranked[:limit])
    return text + (f", and {len(ranked) - limit} other types" if len(ranked) > limit else "")


def _why_unhandled(module: nn.Module) -> str:
    reason = unsupported_reason(module) if "qkv" in module._modules else None
    return reason or "its q/k/v projections are not nn.Linear modules called in forward"


def _looks_like_attention(module: nn.Module) -> bool:
    return bool(PROJECTION_CHILD_NAMES & set(module._modules)) or "in_proj_weight" in module._parameters


def _find_sites(model: nn.Module, strict: bool) -> list[AttentionSite]:
    sites, unhandled = find_attention(model)
    if unhandled:
        listing = "; ".join(f"{p or '<root>'} ({type(m).__name__}): {_why_unhandled(m)}" for p, m in unhandled[:8])
        message = (
            f"vpetl cannot adapt {len(unhandled)} attention module(s): {listing}. Pass strict=False to "
            "adapt the rest and leave these frozen, or open an issue with the model name."
        )
        if strict:
            raise InjectionError(message)
        warnings.warn(message, stacklevel=3)
    if not sites:
        raise InjectionError(
            f"found no attention module in {type(model).__name__} (it contains {_module_census(model)}). "
            "vpetl adapts attention with a fused qkv nn.Linear, separate q/k/v (or q + kv) nn.Linear "
            "children, nn.MultiheadAttention and torchvision window attention. For a model without "
            "attention use method 'linear', 'bitfit' or 'full'."
        )
    return sites


def _add_branches(
    model: nn.Module, sites: list[AttentionSite], config: InjectConfig, record: InjectionRecord, strict: bool
) -> None:
    if config.patt or config.lora or config.prefix:
        for site in sites:
            _add_projection_branches(site, config, record)
    if config.adapter is not None:
        _add_adapters(model, sites, config, record, strict)
    if config.prompt is not None:
        from .prompts import add_prompts

        for path, branch in add_prompts(model, [s.path for s in sites], config.prompt, record).items():
            ref = next(branch.parameters())
            branch.place(ref.device, ref.dtype, _fp32(config))
            record.branches[path] = branch


def _add_projection_branches(site: AttentionSite, config: InjectConfig, record: InjectionRecord) -> None:
    try:
        spec = site.handler.spec(site.module)
    except InjectionError as error:
        raise InjectionError(f"{site.path or '<root>'}: {error}") from error
    branches, token_branches = [], []
    if config.prefix is not None:
        d_key, d_value = _key_value_widths(site, spec)
        prefix = PrefixBranch(spec.d_in, d_key, d_value, config.prefix).place(spec.device, spec.dtype, _fp32(config))
        record.add_module(site.module, "vpetl_prefix", prefix)
        record.branches[_join(site.path, "vpetl_prefix")] = prefix
        token_branches.append(prefix)
    for cfg, name in ((config.patt, "vpetl_patt"), (config.lora, "vpetl_lora")):
        if cfg is None:
            continue
        missing = [c for c in cfg.positions if c not in spec.widths]
        if missing:
            raise InjectionError(
                f"{site.path} ({type(site.module).__name__}) has no projection for positions {missing}; "
                f"it has {''.join(spec.widths)}. Choose positions from those."
            )
        widths = {c: spec.widths[c] for c in cfg.positions}
        if name == "vpetl_patt":
            bias = spec.bias if cfg.bias is None else cfg.bias
            branch = PattBranch(spec.d_in, widths, cfg, bias=bias)
            branch.kernel = config.kernel
        else:
            branch = LoraBranch(spec.d_in, widths, cfg)
        branch.place(spec.device, spec.dtype, _fp32(config))
        record.add_module(site.module, name, branch)
        record.branches[_join(site.path, name)] = branch
        concat = name == "vpetl_patt" and cfg.variant is PattVariant.CONCAT
        (token_branches if concat else branches).append(branch)
    try:
        if branches:
            site.handler.wire(site.module, branches, record)
        if token_branches:
            site.handler.wire_extra_keys(site.module, token_branches, record)
    except InjectionError as error:
        raise InjectionError(f"{site.path or '<root>'}: {error}") from error
    record.sites.append((site.module, site.handler))


def _key_value_widths(site: AttentionSite, spec: Any) -> tuple[int, int]:
    if "k" not in spec.widths or "v" not in spec.widths:
        raise InjectionError(
            f"{site.path} ({type(site.module).__name__}) has no key and value projections to extend with "
            f"prefix tokens; it has {''.join(spec.widths)}."
        )
    return spec.widths["k"], spec.widths["v"]


def _add_adapters(
    model: nn.Module, sites: list[AttentionSite], config: InjectConfig, record: InjectionRecord, strict: bool
) -> None:
    done: set[str] = set()
    missing: list[str] = []
    for site in sites:
        mlp_site = locate_mlp(model, site.path)
        if mlp_site is None:
            missing.append(f"{site.path} ({type(site.module).__name__})")
            continue
        if mlp_site.path in done:
            continue
        done.add(mlp_site.path)
        ref = next(mlp_site.module.parameters())
        adapter = AdapterBranch(mlp_site.d_in, config.adapter, mlp_site.d_out).place(ref.device, ref.dtype, _fp32(config))
        adapter.kernel = config.kernel
        mlp_site.wire(adapter, record)
        record.branches[_join(mlp_site.path, "vpetl_adapter")] = adapter
    if missing:
        message = (
            f"found no MLP beside {len(missing)} attention module(s): {', '.join(missing[:8])}; the adapter "
            "sits beside a block's MLP: a child named mlp/ffn/feed_forward made of nn.Linear layers (a "
            "convolutional MLP does not qualify), or an HF intermediate/output pair. Pass strict=False "
            "to skip these blocks."
        )
        if strict or not done:
            raise InjectionError(message)
        warnings.warn(message, stacklevel=4)


def _set_trainable(model: nn.Module, config: InjectConfig, record: InjectionRecord, sites: list[AttentionSite]) -> None:
    record.remember_requires_grad(model)
    record.head_paths = find_head_paths(model)
    branch_params = {id(p) for b in record.branches.values() for p in b.parameters()}
    if config.tune:
        from .tune import tune_parameters

        branch_params |= {id(p) for p in tune_parameters(model, [(s.path, s.module) for s in sites], config.tune)}
    head_prefixes = tuple(p + "." for p in record.head_paths) if config.train_head else ()
    trainable = []
    for name, param in model.named_parameters():
        train = (
            id(param) in branch_params
            or config.train_all
            or name.startswith(head_prefixes) and bool(head_prefixes)
            or config.train_biases and name.rsplit(".", 1)[-1].endswith("bias")
        )
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    record.delta_names = tuple(trainable)


def _fp32(config: InjectConfig) -> bool:
    return config.branch_dtype is BranchDtype.FLOAT32


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@contextmanager
def record_calls(model: nn.Module) -> Iterator[set[int]]:
    """Within the block, every branch of ``model`` logs its id when forward reaches it."""
    record = _require_record(model)
    log: set[int] = set()
    for branch in record.branches.values():
        branch._call_log = log
    try:
        yield log
    finally:
        for branch in record.branches.values():
            branch._call_log = None


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
    record = get_record(module)
    if record is not None:
        log: set[int] = set()
        for branch in record.branches.values():
            branch._call_log = log


def _finish_check(module: nn.Module, args: Any, output: Any) -> None:
    record = get_record(module)
    if record is None or not record.branches or record.disabled:
        return  # a forward inside vpetl.disabled() calls no branch by design: check the next one
    log = next(iter(record.branches.values()))._call_log
    for branch in record.branches.values():
        branch._call_log = None
    record.remove_hooks(module)
    if log is not None:
        _raise_if_uncalled(module, log)


def _require_record(model: nn.Module) -> InjectionRecord:
    record = get_record(model)
    if record is None:
        raise InjectionError(f"this {type(model).__name__} is not injected; call vpetl.inject(model, ...) first.")
    return record


def branches_of(model: nn.Module) -> dict[str, Branch]:
    """The injected branches by parameter-name prefix."""
    return dict(_require_record(model).branches)
