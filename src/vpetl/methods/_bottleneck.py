"""The bottleneck-adapter family (Adapter+, Houlsby, Pfeiffer): one module, several places.

The module (Steitz & Roth, CVPR'24, Sec. 3; official code visinf/adapter_plus,
``adapter_plus/vit_adapter.py``, class ``Adapter``)::

    A(x) = s ⊙ DropPath(W_u Dropout(act(W_d LN_a(x) + b_d)) + b_u)

    x: (..., D)  channels last, any leading shape (ViT (B, N, D), Swin3D (B, T, H, W, D))
    LN_a: LayerNorm(D) or the identity        W_d: (r, D), b_d: (r,)
    W_u: (D, r), b_u: (D,)                    s: a constant, one trained scalar, or a trained (D,)
    r = d_bottle

It is added as ``y + A(y)`` to some tensor ``y`` of the block, which each method chooses:

* Adapter+ (``adapter_plus``): ``y`` = the block output, after the MLP residual
  (:class:`BlockOutput` on the block);
* Pfeiffer (``pfeiffer``): the same place, with ``LN_a`` (the official ``forward_pfeiffer``
  computes ``y + m + A(y + m)`` = ``h + A(h)`` with ``h`` the block output);
* Houlsby (``houlsby``): ``y`` = the attention output and ``y`` = the MLP output, each before
  its residual add (:class:`BranchOutput` on the attention and on the MLP, or on the block's
  LayerScale ``ls1``/``ls2`` when it has one, as the official code adapts after LayerScale).

Initialisations (``AdapterInit``, from the official ``Adapter.__init__``): ``houlsby``: both
weights trunc-normal std 0.01 cut at ±0.02, biases 0 (near identity); ``bert``: both weights
N(0, 0.02²), biases 0; ``lora``: ``W_d`` Kaiming-uniform, ``b_d`` U(±1/sqrt(D)), ``W_u`` and
``b_u`` zero (exactly the identity at init). Drop-path (stochastic depth on ``A``, per sample)
and dropout (after the activation) act in training mode only.

Where a wrapped module returns a tuple (HF attention returns ``(output, weights)``), the
first element is adapted and the rest passed through. Not mergeable: the activation makes
``A`` nonlinear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import ACTIVATIONS, Branch
from ..derived import Derived
from ..errors import InjectionError
from ..options import Activation, enum_value, flag, frozen_set, number, probability, width
from ..registry import Method

if TYPE_CHECKING:
    from ..blocks import Block
    from ..inject import Injection


class AdapterInit(str, Enum):
    """How ``W_d``, ``W_u`` and the biases start (the official ``init`` option)."""

    HOULSBY = "houlsby"  # trunc-normal std 0.01 at ±0.02, biases 0 (Houlsby et al. 2019)
    BERT = "bert"  # normal std 0.02, biases 0
    LORA = "lora"  # W_d Kaiming-uniform, W_u = 0: identity at init


class AdapterScaling(str, Enum):
    """What ``s`` is (the official ``scaling`` option): a constant ``scale`` (``FIXED``), one
    trained scalar (``LEARNED``) or a trained per-channel vector (``CHANNEL``), both
    initialised at ``scale``."""

    FIXED = "fixed"
    LEARNED = "learned"
    CHANNEL = "channel"


@dataclass(frozen=True)
class BottleneckMethod(Method):
    """Options shared by the adapter family (the official ``conf/adapter/base_adapter.yaml``:
    dim 8, GELU, bias, Houlsby init, scale 1, dropout 0, drop-path 0.1); each method sets its
    own defaults. Not registered itself: :mod:`.adapter_plus`, :mod:`.houlsby` and
    :mod:`.pfeiffer` are."""

    why_not_mergeable: ClassVar[str] = (
        "W_u act(W_d x + b_d) is not linear in x, so no weight matrix reproduces the adapter"
    )

    d_bottle: int = 8
    activation: Activation = Activation.GELU
    layer_norm: bool = False
    scaling: AdapterScaling = AdapterScaling.FIXED
    scale: float = 1.0
    init: AdapterInit = AdapterInit.HOULSBY
    bias: bool = True
    dropout: float = 0.0
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        label = type(self).__name__
        width(self.d_bottle, f"{label} d_bottle")
        frozen_set(self, "activation", enum_value(Activation, self.activation, f"{label} activation"))
        flag(self.layer_norm, f"{label} layer_norm")
        frozen_set(self, "scaling", enum_value(AdapterScaling, self.scaling, f"{label} scaling"))
        frozen_set(self, "scale", number(self.scale, f"{label} scale"))
        frozen_set(self, "init", enum_value(AdapterInit, self.init, f"{label} init"))
        flag(self.bias, f"{label} bias")
        frozen_set(self, "dropout", probability(self.dropout, f"{label} dropout"))
        frozen_set(self, "drop_path", probability(self.drop_path, f"{label} drop_path"))

    def make_adapter(self, dim: int, eps: float = 1e-6) -> BottleneckAdapter:
        """A :class:`BottleneckAdapter` of width ``dim`` with these options, of this method's kind."""
        return BottleneckAdapter(dim, self, eps=eps, kind=self.kind)


class BottleneckAdapter(Branch):
    """``A(x) = s ⊙ DropPath(W_u Dropout(act(W_d LN_a(x) + b_d)) + b_u)`` over the last axis
    (see the module docs); :meth:`add_to` returns ``y + A(y)``.

    Parameters: ``norm`` (LN_a, if any), ``down`` (``W_d``, ``b_d``), ``up`` (``W_u``,
    ``b_u``) and ``scale`` (a ``(1,)`` or ``(D,)`` Parameter when ``s`` is trained).
    """

    kind = "bottleneck"

    def __init__(self, dim: int, config: BottleneckMethod, eps: float = 1e-6, kind: str = "bottleneck") -> None:
        super().__init__()
        self.kind = kind
        self.dim = dim
        self.activation = config.activation
        self.dropout = config.dropout
        self.drop_path = config.drop_path
        self.norm = nn.LayerNorm(dim, eps=eps) if config.layer_norm else None
        self.down = nn.Linear(dim, config.d_bottle, bias=config.bias)
        self.up = nn.Linear(config.d_bottle, dim, bias=config.bias)
        self.fixed_scale = config.scale
        if config.scaling is AdapterScaling.FIXED:
            self.scale = None
        else:
            shape = (dim,) if config.scaling is AdapterScaling.CHANNEL else (1,)
            self.scale = nn.Parameter(torch.full(shape, float(config.scale)))
        _initialise(self.down, self.up, config.init)

    def forward(self, x: Tensor) -> Tensor:
        """``A(x)``, in ``x``'s dtype (outside autocast)."""
        self._mark_called()
        h = self._input(x, self.down.weight)
        if self.norm is not None:
            h = self.norm(h)
        h = ACTIVATIONS[self.activation](self.down(h))
        if self.dropout > 0.0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.up(h)
        if self.drop_path > 0.0 and self.training:
            keep = 1.0 - self.drop_path
            mask = h.new_empty((h.shape[0],) + (1,) * (h.dim() - 1)).bernoulli_(keep)
            h = h * mask.div_(keep)
        h = h * self.fixed_scale if self.scale is None else h * self.scale
        if h.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            h = h.to(x.dtype)
        return h

    def add_to(self, y: Tensor) -> Tensor:
        """``y + A(y)``."""
        if y.shape[-1] != self.dim:
            raise InjectionError(
                f"the {self.kind} adapter was built for {self.dim} channels (last axis) but reads a tensor of shape "
                f"{tuple(y.shape)}; the wrapped module does not keep its channels last. vpetl.unload(model) restores "
                "the original."
            )
        return y + self(y)

    def extra_repr(self) -> str:
        scaling = "fixed" if self.scale is None else ("channel" if self.scale.numel() > 1 else "learned")
        return (
            f"dim={self.dim}, activation={self.activation.value}, scaling={scaling}, scale={self.fixed_scale}, "
            f"dropout={self.dropout}, drop_path={self.drop_path}"
        )


def _initialise(down: nn.Linear, up: nn.Linear, init: AdapterInit) -> None:
    """The official ``Adapter.__init__`` initialisations (see :class:`AdapterInit`)."""
    zero_biases = (down, up)
    if init is AdapterInit.HOULSBY:
        std = 0.01  # the paper's value (Houlsby et al.'s own code: 0.001), cut at ±2 std
        for layer in (down, up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    elif init is AdapterInit.BERT:
        for layer in (down, up):
            nn.init.normal_(layer.weight, mean=0.0, std=0.02)
    else:  # LORA: nn.Linear's default for the down-projection, zeros for the up-projection
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        if down.bias is not None:
            bound = 1 / math.sqrt(down.in_features)
            nn.init.uniform_(down.bias, -bound, bound)
        nn.init.zeros_(up.weight)
        zero_biases = (up,)
    for layer in zero_biases:
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------- wiring


def add_to_output(out: Any, adapter: BottleneckAdapter, owner: nn.Module) -> Any:
    """``out + A(out)`` for a tensor; for a tuple (HF attention: ``(output, weights)``, older
    HF layers: ``(hidden_states, ...)``) the first element is adapted."""
    if isinstance(out, Tensor):
        return adapter.add_to(out)
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        first = adapter.add_to(out[0])
        if hasattr(out, "_replace"):  # a namedtuple
            return out._replace(**{out._fields[0]: first})
        return (first, *out[1:])
    raise InjectionError(
        f"vpetl's {adapter.kind} adapter adds to the output of {type(owner).__name__}, which returned "
        f"{type(out).__name__}; it needs a tensor or a tuple whose first element is a tensor. Please report the "
        "model class; vpetl.unload(model) restores the original."
    )


class AddsAdapter(Derived):
    """Mixin base: ``forward`` returns ``out + A(out)`` with ``out = Base.forward(...)``; ``A`` is
    reached through the plain attribute named by ``adapter_attr`` (set by
    :meth:`vpetl.inject.Injection.derive`).

    Each method site subclasses it with its own ``adapter_attr``, and each subclass gets its own
    ``forward`` (made here), so several of them stacked on one module (Adapter+ and Pfeiffer on
    one block) each add their adapter: a shared inherited ``forward`` would run once.
    """

    adapter_attr: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter_attr" not in cls.__dict__:
            return  # a class derived_class made from a mixin: it inherits the mixin's forward
        attr = cls.adapter_attr

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super(cls, self).forward(*args, **kwargs)
            return add_to_output(out, getattr(self, attr)[0], self)

        forward.__qualname__ = f"{cls.__qualname__}.forward"
        cls.forward = forward


# ---------------------------------------------------------------------------- sites


def attach_after_blocks(method: BottleneckMethod, injection: Injection, mixin: type[AddsAdapter]) -> None:
    """One adapter per block with an MLP, as ``<block>.vpetl_<kind>``, added to the block's
    output through ``mixin`` (whose ``adapter_attr`` is ``_vpetl_<kind>``): Adapter+ and Pfeiffer."""
    for block in adapted_blocks(injection, method.name):
        adapter = method.make_adapter(block.mlp.d_out, eps=norm_eps(injection.model, block.norm2))
        injection.place(adapter, reference_tensor(block.module))
        injection.add_branch(block.path, f"vpetl_{method.kind}", adapter)
        injection.derive(block.path, mixin, mixin.adapter_attr, adapter)


def adapted_blocks(injection: Injection, method: str) -> list[Block]:
    """The blocks that have an MLP (the family's adapters sit after it); an error if none has."""
    blocks = [b for b in injection.blocks() if b.mlp is not None]
    if not blocks:
        raise InjectionError(
            f"{method} adds its adapter after each transformer block's MLP, but none of the "
            f"{len(injection.blocks())} block(s) holding attention in {type(injection.model).__name__} has an MLP "
            "vpetl recognises (a child named mlp/ffn/feed_forward made of nn.Linear layers, or an HF "
            "intermediate/output pair)."
        )
    return blocks


def norm_eps(model: nn.Module, path: str | None) -> float:
    """The eps of the LayerNorm at ``path`` (LN_a follows the backbone's norm), else 1e-6."""
    module = model.get_submodule(path) if path else None
    return float(module.eps) if isinstance(module, nn.LayerNorm) else 1e-6


def reference_tensor(module: nn.Module) -> Tensor:
    """A parameter of ``module`` (device and dtype for placing a branch beside it)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param
    return torch.empty(0)


def layer_scale_path(block: Block, name: str) -> str | None:
    """``<block>.<name>`` when the block has such a child that is not the identity (timm's
    LayerScale ``ls1``/``ls2``): its output is the branch output the official code adapts."""
    child = block.module._modules.get(name)
    if child is None or isinstance(child, nn.Identity):
        return None
    return f"{block.path}.{name}" if block.path else name


def mlp_child_path(block: Block, method: str) -> str:
    """The path of the block's MLP module, whose output is the MLP output before the residual."""
    mlp = getattr(block.mlp, "mlp", None)
    for name, child in block.module.named_children():
        if mlp is not None and child is mlp:
            return f"{block.path}.{name}" if block.path else name
    raise InjectionError(
        f"{method} adapts the MLP output before its residual add, but the MLP of {block.path or '<root>'} "
        f"({type(block.module).__name__}) is not one child module returning it ({type(block.mlp).__name__}; "
        "e.g. an HF intermediate/output pair adds the residual inside). Use adapter_plus or pfeiffer, which "
        "adapt the block output, instead."
    )
