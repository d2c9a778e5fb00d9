"""Convpass (Jie & Deng 2022, JieShibo/PETL-ViT ``convpass/``): a convolutional bypass beside
the attention and beside the MLP of every ViT block, reading the same normed tokens::

    x = x + attn(z1) + s * C(z1),   z1 = norm1(x)
    x = x + mlp(z2)  + s * C(z2),   z2 = norm2(x)

    C(z):  a = QuickGELU(z W_d^T + b_d)                     z: (B, p + H*W, D) -> a: (B, p + H*W, r)
           patches: a[:, p:] -> (B, r, H, W) -> Conv2d 3x3 (r -> r, padding 1) -> (B, H*W, r)
           prefix:  a[:, :p] through the same conv as 1x1 maps (only the centre tap meets them)
           C(z) = dropout(QuickGELU([prefix; patches])) W_u^T + b_u                 -> (B, N, D)

``QuickGELU(t) = t * sigmoid(1.702 t)``, dropout 0.1, ``r = 8``. Init (official code):
``W_d`` xavier-uniform, ``W_u`` and every bias zero (the model is unchanged at step 0), the
conv weight zero with the identity at its centre tap (``xavier_conv=True``: xavier-uniform,
which the official VTAB configs pick for about half the tasks). ``s = 1`` (``set_Convpass``'s
default; its VTAB configs tune it per task in {0.01, 0.1, 1, 10, 100}). Count per bypass
``2*D*r + 9*r*r + 2*r + D``: 13,648 for ViT-B (``D = 768``), 327,552 for its 24.

The grid is square, ``H = W = sqrt(N - p)`` with ``p`` the prefix tokens (timm's
``num_prefix_tokens``, else 1 for a class-token parameter plus register tokens), read from each
forward's token count (14 x 14 for ViT-B/16 at 224). A grid known at inject time (timm
``grid_size``, HF ``image_size / patch_size``) must be square; a token count that leaves no
square grid raises at forward. Convpass applies to plain ViTs whose blocks take a batch-first
``(B, N, D)`` token sequence (timm ViT/DeiT, torchvision ViT, HF ViT); window attention (Swin,
Video Swin) and token pooling (MViT) are refused at inject time.

Each bypass adds to its module's output (a derived class of the attention module and of the
MLP, :mod:`vpetl.derived`; a tuple output, as HF attention returns, gets it on its first
element). Both bypasses are registered on the block: ``<block>.vpetl_convpass.attn.*`` and
``<block>.vpetl_convpass.mlp.*``. Not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import Branch
from ..derived import Derived
from ..errors import InjectionError
from ..handlers.hf_mlp import SplitMlpSite
from ..options import flag, frozen_set, number, probability, width
from ..registry import Method, register
from .vpt import _not_a_sequence, prefix_token_count

if TYPE_CHECKING:
    from ..blocks import Block
    from ..inject import Injection

NAME = "vpetl_convpass"
ATTR = "_vpetl_convpass"
HIDDEN_NAMES = ("hidden_states", "x", "query", "input", "src")  # keyword names of a module's token input
ALTERNATIVES = "Use 'repadapter', 'adapter', 'lora', 'patt' or 'bapat' on this model."


@register
@dataclass(frozen=True)
class Convpass(Method):
    """Convpass: ``s * C(z)`` beside attention and MLP (module docs), a bottleneck with a 3x3
    convolution over the patch grid; the up-projection is zero, so the model starts unchanged."""

    name: ClassVar[str] = "convpass"
    kind: ClassVar[str] = "convpass"
    paper: ClassVar[str] = "Convpass (Jie & Deng 2022), JieShibo/PETL-ViT convpass/"
    formula: ClassVar[str] = "per block 2*(2*d*r + 9*r*r + 2*r + d)"
    why_not_mergeable: ClassVar[str] = (
        "QuickGELU and the 3x3 convolution across neighbouring tokens are not a per-token linear map, so no "
        "weight matrix reproduces them"
    )
    conflicts: ClassVar[frozenset[str]] = frozenset({"vpt"})
    conflict_reason: ClassVar[str] = (
        "Convpass reshapes the tokens after the prefix into a square patch grid, and VPT's prompt tokens sit "
        "between the prefix and the patches"
    )

    d_bottle: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    xavier_conv: bool = False

    def __post_init__(self) -> None:
        width(self.d_bottle, "Convpass d_bottle")
        frozen_set(self, "scale", number(self.scale, "Convpass scale"))
        frozen_set(self, "dropout", probability(self.dropout, "Convpass dropout"))
        flag(self.xavier_conv, "Convpass xavier_conv")

    def attach(self, injection: Injection) -> None:
        """One :class:`ConvpassPair` per block (``<block>.vpetl_convpass``); the attention module
        and the MLP get a derived class that adds their bypass to their output."""
        model = injection.model
        blocks = injection.blocks()
        for block in blocks:
            _check_block(model, block)
        _check_static_grid(model)
        prefix = prefix_token_count(model)
        for block in blocks:
            d_attn = injection.projection_spec(block.site, "", "Convpass").d_in
            pair = ConvpassPair(ConvpassBranch(d_attn, self, prefix), ConvpassBranch(block.mlp.d_in, self, prefix))
            pair.train(block.module.training)  # dropout follows the model's mode
            path = injection.add_branch(block.path, NAME, injection.place(pair, next(block.site.module.parameters())))
            injection.adopt(f"{path}.attn", pair.attn)
            injection.adopt(f"{path}.mlp", pair.mlp)
            injection.derive(block.attention_path, _AttentionBypass, ATTR, pair)
            injection.derive(_mlp_path(block), _MlpBypass, ATTR, pair)


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``, as the official Convpass uses."""
    return x * torch.sigmoid(1.702 * x)


class ConvpassBranch(Branch):
    """One bypass ``C(z)`` (module docs) on ``(B, p + H*W, D)`` tokens, ``p = prefix``."""

    kind = "convpass"

    def __init__(self, d: int, config: Convpass, prefix: int) -> None:
        super().__init__()
        r = config.d_bottle
        self.scale = config.scale
        self.prefix = prefix
        self.down = nn.Linear(d, r)
        self.conv = nn.Conv2d(r, r, 3, padding=1)
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(r, d)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if config.xavier_conv:
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            nn.init.zeros_(self.conv.weight)
            with torch.no_grad():
                self.conv.weight[:, :, 1, 1] = torch.eye(r)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: Tensor) -> Tensor:
        """``C(z)`` unscaled, ``(B, N, D)``, in the branch's dtype."""
        self._mark_called()
        side = self.grid_side(z)
        p = self.prefix
        a = quick_gelu(self.down(self._input(z, self.down.weight)))  # (B, N, r)
        grid = a[:, p:].unflatten(1, (side, side)).permute(0, 3, 1, 2)  # (B, r, H, W)
        patches = self.conv(grid).flatten(2).transpose(1, 2)  # (B, H*W, r)
        centre = F.linear(a[:, :p], self.conv.weight[:, :, 1, 1], self.conv.bias)  # a 1x1 map sees the centre tap only
        h = self.dropout(quick_gelu(torch.cat([centre, patches], dim=1)))
        return self.up(h)

    def grid_side(self, z: Any) -> int:
        """``sqrt(N - p)``; :class:`InjectionError` unless ``z`` is ``(B, N, D)`` with a square grid."""
        d = self.down.in_features
        if not isinstance(z, Tensor) or z.dim() != 3 or z.shape[-1] != d:
            found = f"a tensor of shape {tuple(z.shape)}" if isinstance(z, Tensor) else f"a {type(z).__name__}"
            raise InjectionError(
                f"Convpass received {found}; it needs a batch-first token sequence (B, N, {d}). Convpass applies to "
                f"plain ViTs. {ALTERNATIVES}"
            )
        patches = z.shape[1] - self.prefix
        side = math.isqrt(max(patches, 0))
        if patches < 1 or side * side != patches:
            raise InjectionError(
                f"Convpass received {z.shape[1]} tokens; after the {self.prefix} prefix token(s) the {patches} patch "
                "tokens do not form a square grid, which its 3x3 convolution needs. Feed square images (e.g. 224x224 "
                f"for 14x14 patches of 16), or {ALTERNATIVES[0].lower()}{ALTERNATIVES[1:]}"
            )
        return side

    def add_to(self, out: Any, z: Tensor) -> Any:
        """``out + s * C(z)``; a tuple ``out`` gets it on its first element."""
        if isinstance(out, (tuple, list)):
            return type(out)([self.add_to(out[0], z), *out[1:]])
        return out + (self(z) * self.scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, prefix={self.prefix}"


class ConvpassPair(Branch):
    """A block's two bypasses: ``attn`` (beside attention) and ``mlp`` (beside the MLP)."""

    kind = "convpass"

    def __init__(self, attn: ConvpassBranch, mlp: ConvpassBranch) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp

    def add(self, role: str, out: Any, z: Tensor) -> Any:
        self._mark_called()
        return getattr(self, role).add_to(out, z)


def _token_input(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    name = next((n for n in HIDDEN_NAMES if n in kwargs), None)
    if name is None:
        raise InjectionError(
            f"{type(module).__name__} was called without a token tensor (no positional argument and none of the "
            f"keywords {', '.join(HIDDEN_NAMES)}); Convpass reads the module's (B, N, D) input. {ALTERNATIVES}"
        )
    return kwargs[name]


class _AttentionBypass(Derived):
    """Mixin for the attention module: ``attn(z) + s * C_attn(z)``."""

    class_prefix = "Convpassed"

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return getattr(self, ATTR)[0].add("attn", out, _token_input(self, args, kwargs))


class _MlpBypass(Derived):
    """Mixin for the MLP: ``mlp(z) + s * C_mlp(z)``."""

    class_prefix = "Convpassed"

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return getattr(self, ATTR)[0].add("mlp", out, _token_input(self, args, kwargs))


# ----------------------------------------------------------------------------- placement


def _check_block(model: nn.Module, block: Block) -> None:
    """Raise unless ``block`` is a plain ViT block: a (B, N, D) sequence, an attention child, an MLP child."""
    where = f"{block.path} ({type(block.module).__name__})"
    attention = model.get_submodule(block.attention_path)
    if isinstance(block.module, nn.TransformerEncoderLayer) or isinstance(attention, nn.TransformerEncoderLayer):
        reason = "is an nn.TransformerEncoderLayer, whose fused fast path bypasses its submodules"
    else:
        reason = _not_a_sequence(block.module, attention)
    if reason is None and block.mlp is None:
        reason = "has no MLP"
    if reason is None and isinstance(block.mlp, SplitMlpSite):
        reason = "splits its MLP in two modules (intermediate / output), so no one module returns the MLP's output"
    if reason is None and _mlp_path(block) is None:
        reason = "has no MLP child module"
    if reason is not None:
        raise InjectionError(
            f"Convpass cannot be added to this {type(model).__name__}: {where} {reason}. Convpass applies to plain "
            f"ViTs (timm ViT/DeiT, torchvision ViT, HF ViT) whose blocks take a (B, 1 + H*W, D) token sequence and "
            f"reshape it into the H x W patch grid. {ALTERNATIVES}"
        )


def _mlp_path(block: Block) -> str | None:
    """The path of the MLP module beside ``block``'s attention (a child of the MLP site's block)."""
    mlp = getattr(block.mlp, "mlp", None)
    if mlp is None:
        return None
    name = next((n for n, m in block.mlp.module.named_children() if m is mlp), None)
    if name is None:
        return None
    return f"{block.mlp.path}.{name}" if block.mlp.path else name


def _check_static_grid(model: nn.Module) -> None:
    """Raise when the model's patch embedding fixes a non-square grid (timm ``grid_size``, HF / torchvision
    ``image_size`` and ``patch_size``); a model with dynamic image sizes is checked at forward instead."""
    for path, module in model.named_modules():
        if getattr(module, "dynamic_img_size", False) is True:
            return
        grid = _pair(getattr(module, "grid_size", None))
        if grid is None:
            size, patch = _pair(getattr(module, "image_size", None)), _pair(getattr(module, "patch_size", None))
            if size is None or patch is None or 0 in patch:
                continue
            grid = (size[0] // patch[0], size[1] // patch[1])
        if grid[0] != grid[1]:
            raise InjectionError(
                f"Convpass needs a square patch grid for its 3x3 convolution; {path or '<root>'} "
                f"({type(module).__name__}) makes a {grid[0]} x {grid[1]} grid. Build the model for square images, "
                f"or {ALTERNATIVES[0].lower()}{ALTERNATIVES[1:]}"
            )
        return


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None

