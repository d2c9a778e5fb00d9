"""SSF (Lian et al., NeurIPS 2022; dongzelian/SSF): scale and shift the features after an operation::

    y = gamma ⊙ op(x) + beta          gamma, beta: (C,)  for op's C output channels

``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)`` (the official ``init_ssf_scale_shift``). Sites, as in
the official ViT and Swin code: the patch-embedding convolution; per block after ``norm1``, the
q/k/v projection(s) (timm's fused ``qkv``, 3C wide; HF's separate query/key/value; torchvision's
window ``qkv``), the attention's output projection, ``norm2``, the MLP's first Linear (before the
activation) and its last; after every LayerNorm outside the blocks (the patch-embedding norm,
Swin's patch-merging norms, the final norm); never the head. ViT-B/16: 1,536 + 12·2·(768 + 2,304
+ 768 + 768 + 3,072 + 768) + 1,536 = 205,824 parameters; Swin-B: 274,432.

vpetl applies it as an *effective parameter*: the adapted module's class is derived
(:mod:`vpetl.derived`) so that reading its ``weight`` / ``bias`` gives::

    Linear / Conv:   W' = gamma[:, None, ...] * W      b' = gamma * b + beta   (beta if no bias)
    LayerNorm:       w' = gamma * w                    b' = gamma * b + beta

which is exactly ``gamma ⊙ op(x) + beta`` (a LayerNorm's output is ``w ⊙ x̂ + b``). Every forward
that reads the module's weights gets them, including those that never call the module
(torchvision window attention reads ``attn.qkv.weight`` itself). ``gamma`` / ``beta`` are
``<path>.vpetl_ssf.scale`` / ``.shift``; base keys never change. Merging writes ``W'`` and
``b'`` into the base Parameters (a module without a bias cannot take ``beta``: merge refuses).
Trade-off: training computes the weight gradient ``g^T x`` of every adapted Linear to reach
``gamma`` (scaling the output instead would not), about a third more work on those Linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..branches import Branch
from ..derived import Derived
from ..errors import InjectionError, MergeError, format_names
from ..heads import find_head_paths
from ..record import AttrSet
from ..registry import BRANCH_MARKER, Method, register

if TYPE_CHECKING:
    from ..inject import Injection
    from ..record import InjectionRecord

SSF_ATTR = "_vpetl_ssf"  # plain attribute on the adapted module: (its SSFBranch,)
BRANCH_NAME = "vpetl_ssf"
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)


@register
@dataclass(frozen=True)
class SSF(Method):
    """SSF: ``gamma ⊙ op(x) + beta`` after the patch embedding, every block's norms, q/k/v,
    attention output and MLP Linears, and the norms outside the blocks (see the module docs).
    No options: one ``gamma`` and one ``beta`` per output channel of each site."""

    name: ClassVar[str] = "ssf"
    kind: ClassVar[str] = "ssf"
    paper: ClassVar[str] = "SSF (Lian et al., NeurIPS 2022)"
    formula: ClassVar[str] = "2*C per adapted module (C its output channels); ViT-B/16 205,824"
    width_field: ClassVar[None] = None
    mergeable: ClassVar[bool] = True
    # vpetl.merge should fold SSF before any other entry: the others' deltas (LoRA's B A) are
    # added outside SSF's scaling, so they must land in the raw weight after it is scaled.
    merge_first: ClassVar[bool] = True

    def attach(self, injection: Injection) -> None:
        """One :class:`SSFBranch` per site, as ``<site>.vpetl_ssf``; the site's class is derived."""
        for path, module in ssf_sites(injection):
            like = next(module.parameters(), None)
            like = like if like is not None else next(injection.model.parameters())
            branch = injection.place(SSFBranch(_channels(path, module)), like)
            injection.add_branch(path, BRANCH_NAME, branch)
            injection.derive(path, _SSFParameters, SSF_ATTR, branch)
            owner = injection.model.get_submodule(path.rpartition(".")[0]) if "." in path else injection.model
            if getattr(owner, "q_bias", None) is not None and getattr(owner, "qkv_bias_separate", None) is False:
                # timm BEiT/EVA add their q/v biases through F.linear(x, qkv.weight, q_bias...), which
                # would drop beta; with qkv_bias_separate they call qkv(x) and add them after.
                injection.record.set_attr(owner, "qkv_bias_separate", True)

    def merge(self, record: InjectionRecord) -> None:
        """``W <- W'`` and ``b <- b'`` in the base Parameters of every site (in place)."""
        modules = [e.obj for e in record.undo_log if isinstance(e, AttrSet) and e.name == SSF_ATTR]
        paths = {id(b): p.rpartition(".")[0] for p, b in record.branches.items() if isinstance(b, SSFBranch)}
        no_bias = [
            paths.get(id(m.__dict__[SSF_ATTR][0]), type(m).__name__)
            for m in modules if any(m._parameters.get(n) is None for n in _names(type(m)))
        ]
        if no_bias:
            raise MergeError(
                f"SSF cannot be merged into {format_names(no_bias)}: the module has no bias (or no affine "
                "weight) Parameter to hold beta, and merging must not add state-dict keys. Keep the injected "
                "model for inference."
            )
        for module in modules:
            branch = module.__dict__[SSF_ATTR][0]
            if branch.merged:
                continue
            names = _names(type(module))
            # SSF's own transform of the raw Parameters, not getattr: a method derived after SSF on the
            # same module (LoRA, DoRA) reads the weight as its own effective one and merges that itself
            new = [_SSFParameters._vpetl_effective(module, n, module._parameters.get(n)).detach().clone()
                   for n in names]  # both before either is written
            for n, value in zip(names, new):
                module._parameters[n].copy_(value)
            branch.merged = True  # reads now return the (merged) raw Parameters: later merges add into them


class SSFBranch(Branch):
    """``scale`` (gamma, N(1, 0.02)) and ``shift`` (beta, N(0, 0.02)), one per channel."""

    kind = "ssf"

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))
        self.shift = nn.Parameter(torch.empty(channels))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, mean=0.0, std=0.02)
        self.merged = False  # set by SSF.merge: the base Parameters hold W', b'

    def weight(self, raw: Tensor | None) -> Tensor:
        """``gamma`` broadcast over ``raw``'s output-channel axis (dim 0) times ``raw``."""
        self._mark_called()
        if raw is None:  # a norm without an affine weight: gamma alone
            return self.scale
        return (raw * self.scale.view(-1, *[1] * (raw.dim() - 1))).to(raw.dtype)

    def bias(self, raw: Tensor | None, like: Tensor | None) -> Tensor:
        """``gamma * raw + beta`` (``beta`` where there is no bias), in ``raw``'s (or ``like``'s) dtype."""
        self._mark_called()
        if raw is None:
            return self.shift if like is None else self.shift.to(like.dtype)
        return (raw * self.scale + self.shift).to(raw.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[0]}"


class _SSFParameters(Derived):
    """Mixin: the module's ``weight`` / ``bias`` (``in_proj_weight`` / ``in_proj_bias`` for
    ``nn.MultiheadAttention``) read as SSF's effective parameters; the raw Parameters stay in
    ``_parameters`` (state-dict keys, optimizers and ``load_state_dict`` see them)."""

    class_prefix = "VpetlSSF"

    @classmethod
    def derived_namespace(cls, base: type) -> dict[str, Any]:
        weight, bias = _names(base)
        return {
            weight: property(lambda self: self._vpetl_effective(weight, self._parameters.get(weight)),
                             doc="gamma-scaled weight (SSF)"),
            bias: property(lambda self: self._vpetl_effective(bias, self._parameters.get(bias)),
                           doc="gamma-scaled bias plus beta (SSF)"),
        }

    def _vpetl_effective(self, name: str, raw: Tensor | None) -> Tensor | None:
        """SSF's value of parameter ``name`` given its raw value ``raw`` (also called by a
        projection that adopted this module's Parameters)."""
        branch: SSFBranch = self.__dict__[SSF_ATTR][0]
        if branch.merged:
            return raw
        if name.endswith("weight"):
            return branch.weight(raw)
        return branch.bias(raw, self._parameters.get(_names(type(self))[0]))


def _names(cls: type) -> tuple[str, str]:
    if issubclass(cls, nn.MultiheadAttention):
        return "in_proj_weight", "in_proj_bias"
    return "weight", "bias"


def _channels(path: str, module: nn.Module) -> int:
    """The output channels ``C`` of a site; :class:`InjectionError` where SSF cannot adapt it."""
    if not isinstance(module, SUPPORTED):
        raise InjectionError(
            f"SSF cannot adapt {path} ({type(module).__name__}): it scales and shifts through a module's "
            f"weight and bias, which vpetl does for {', '.join(c.__name__ for c in SUPPORTED)} (and subclasses)."
        )
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:
            raise InjectionError(f"SSF cannot adapt {path}: nn.MultiheadAttention with kdim/vdim != embed_dim "
                                 "has no fused in_proj_weight.")
        return module.in_proj_weight.shape[0]
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise InjectionError(f"SSF cannot adapt {path}: a LayerNorm over {tuple(module.normalized_shape)} "
                                 "has no single channel axis.")
        return module.normalized_shape[0]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features


def _qkv_paths(model: nn.Module, block: Any) -> list[str]:
    """The q/k/v projection module(s) of a block's attention site."""
    from ..handlers.base import LinearProjections

    site = block.site
    join = (lambda n: f"{site.path}.{n}") if site.path else (lambda n: n)
    if isinstance(site.handler, LinearProjections):
        return [join(name) for name, _ in site.handler.linears(site.module)]
    for path in (site.path, block.attention_path):  # nn.MultiheadAttention, or the layer holding it
        if isinstance(model.get_submodule(path), nn.MultiheadAttention):
            return [path]
    if isinstance(site.module._modules.get("qkv"), nn.Linear):  # torchvision window attention
        return [join("qkv")]
    raise InjectionError(f"SSF found no q/k/v projection in {site.path} ({type(site.module).__name__}).")


def ssf_sites(injection: Injection) -> list[tuple[str, nn.Module]]:
    """Every ``(path, module)`` SSF adapts, in model order (module docs)."""
    model = injection.model
    blocks = injection.blocks()
    chosen: set[str] = set()
    for block in blocks:
        roles = [block.norm1, *_qkv_paths(model, block), block.attn_proj, block.norm2, block.fc1, block.fc2]
        chosen.update(p for p in roles if p is not None)
    block_paths = {b.path for b in blocks}
    inside = tuple(p + "." for p in block_paths if p)
    heads = find_head_paths(model)
    skip = inside + tuple(p + "." for p in heads)
    convs, seen_block = [], False
    for path, module in model.named_modules():
        if path in block_paths:
            seen_block = True
        if path in block_paths or path in heads or path.startswith(skip) or BRANCH_MARKER in path:
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and not seen_block:
            convs.append(path)  # the patch embedding is the last convolution before the first block
        elif isinstance(module, nn.LayerNorm):
            chosen.add(path)
    if convs:
        chosen.add(convs[-1])
    return [(p, m) for p, m in model.named_modules() if p in chosen]
