"""AdaptFormer's adapter (V-PETL Eq. 6-7): a bottleneck beside (or after) every block's MLP::

    parallel:    y = mlp(x) + s * (act(x W_down^T + b_down) W_up^T + b_up)      x: (..., d)
    sequential:  y = m + s * (act(m W_down^T + b_down) W_up^T + b_up),  m = mlp(x)

``W_down`` Kaiming-uniform, ``W_up`` and both biases zero (the model is unchanged at step 0),
``s = 0.1``, ReLU, width 64. The adapter is registered on the block (``<block>.vpetl_adapter``).
Not mergeable: the activation makes it nonlinear in ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .. import kernels
from ..branches import ACTIVATIONS, Branch
from ..options import Activation, Kernel, enum_value, flag, frozen_set, number, width
from ..registry import Method, register
from ..tracing import plain_path

if TYPE_CHECKING:
    from ..inject import Injection


class AdapterPlacement(str, Enum):
    """Where the adapter sits (Eq. 7): beside the MLP reading its input (``PARALLEL``), or
    after it reading its output, ``y = mlp(x) + s * adapter(mlp(x))`` (``SEQUENTIAL``)."""

    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


@register
@dataclass(frozen=True)
class Adapter(Method):
    """AdaptFormer's adapter (Eq. 6-7): parallel ``mlp(x) + s * up(act(down(x)))`` reading the
    MLP's input, or sequential ``y + s * up(act(down(y)))`` with ``y = mlp(x)``; ``up`` is
    zero-initialised, so the model is unchanged at step 0."""

    name: ClassVar[str] = "adapter"
    kind: ClassVar[str] = "adapter"
    paper: ClassVar[str] = "AdaptFormer (Chen et al. 2022), V-PETL Eq. 6-7"
    formula: ClassVar[str] = "per block 2*d*r + r + d"
    why_not_mergeable: ClassVar[str] = "relu(x W_down) W_up is not linear in x, so no weight matrix reproduces it"

    d_bottle: int = 64
    scale: float = 0.1
    activation: Activation = Activation.RELU
    placement: AdapterPlacement = AdapterPlacement.PARALLEL
    learnable_scale: bool = False

    def __post_init__(self) -> None:
        width(self.d_bottle, "Adapter d_bottle")
        frozen_set(self, "scale", number(self.scale, "Adapter scale"))
        frozen_set(self, "activation", enum_value(Activation, self.activation, "Adapter activation"))
        frozen_set(self, "placement", enum_value(AdapterPlacement, self.placement, "Adapter placement"))
        flag(self.learnable_scale, "Adapter learnable_scale")


    def attach(self, injection: Injection) -> None:
        """One :class:`AdapterBranch` per block with an MLP, as ``<block>.vpetl_adapter``."""
        for site in injection.mlp_sites():
            ref = next(site.module.parameters())
            adapter = AdapterBranch(site.d_in, self, site.d_out)
            injection.add_mlp_branch(site, injection.place(adapter, ref))


class AdapterBranch(Branch):
    """AdaptFormer adapter: ``s * up(act(down(x)))``; identity at init (zero ``up``, zero biases)."""

    kind = "adapter"
    scriptable = True

    def __init__(self, d_in: int, config: Adapter, d_out: int | None = None):
        super().__init__()
        self.scale = config.scale
        self.placement = config.placement
        self.learned_scale = nn.Parameter(torch.tensor(float(config.scale))) if config.learnable_scale else None
        self.activation = config.activation
        self.down = nn.Linear(d_in, config.d_bottle)
        self.up = nn.Linear(config.d_bottle, d_in if d_out is None else d_out)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def reads_output(self) -> bool:
        """True when the adapter reads the MLP's output (sequential placement), not its input."""
        return self.placement is AdapterPlacement.SEQUENTIAL

    def scale_value(self) -> float | Tensor:
        return self.scale if self.learned_scale is None else self.learned_scale

    @torch.jit.unused
    def forward(self, x: Tensor) -> Tensor:
        self._mark_called()
        return self.up(ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))) * self.scale_value()

    def add_to(self, out: Tensor, x: Tensor, kernel: Kernel = Kernel.AUTO) -> Tensor:
        """``out + s * up(act(down(x)))`` with the scale and sum fused into one ``addmm``.

        ``x`` is the MLP's input; with sequential placement the adapter reads ``out``, the
        MLP's output, instead (Eq. 7, second line)."""
        self._mark_called()
        if self.placement is AdapterPlacement.SEQUENTIAL:
            x = out
        if plain_path(out):  # traced or meta (vpetl.tracing): out of place, plain ops
            h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
            return out + (self.up(h) * self.scale_value()).to(out.dtype)
        if self.learned_scale is not None:
            h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
            return out + (self.up(h) * self.learned_scale).to(out.dtype)
        fused = self._fused_add(out, x, kernel)
        if fused is not None:
            return fused
        h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
        flat = out.reshape(-1, out.shape[-1])
        h2d = h.reshape(-1, h.shape[-1])
        if h2d.dtype != flat.dtype:
            h2d = h2d.to(flat.dtype)
        up_w, up_b = self.up.weight.t().to(flat.dtype), self.up.bias.to(flat.dtype)
        if torch.is_grad_enabled():  # out-of-place: the MLP's last op may have saved ``out``
            summed = torch.addmm(flat, h2d, up_w, alpha=self.scale)
        else:  # inference: ``out`` is the MLP's fresh output, nothing else holds it
            summed = flat.addmm_(h2d, up_w, alpha=self.scale)
        return summed.add_(up_b, alpha=self.scale).view(out.shape)

    def _fused_add(self, out: Tensor, x: Tensor, kernel: Kernel) -> Tensor | None:
        """The Triton adapter (:func:`vpetl.kernels.patt_triton.adapter_add`) when the kernel
        asks for it explicitly and covers the call; None: the torch path."""
        device_type = out.device.type
        if not kernels.use_triton(kernel, device_type, auto=False) or out.numel() == 0:
            return None
        if kernels.hooked(self.down, self.up):
            return None  # module hooks on down/up must fire: the fused op does not call them
        params = (self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = out.dtype
            if any(t.dtype != dtype for t in (x, *params)):
                return None
        ops = kernels.triton_ops()
        if dtype not in ops.SUPPORTED_DTYPES or self.down.weight.shape[0] > ops.MAX_RANK:
            return None
        flat = [out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])]
        with torch.autocast(device_type, enabled=False):
            summed = ops.adapter_add(*[t.to(dtype) for t in (*flat, *params)], float(self.scale), self.activation.value)
        return summed.view(out.shape)

    def extra_repr(self) -> str:
        learned = ", learnable_scale=True" if self.learned_scale is not None else ""
        return f"scale={self.scale}{learned}, activation={self.activation.value}, placement={self.placement.value}"


AdapterConfig = Adapter  # the name before vpetl 0.2
