"""A frozen projection Linear that side branches add into, without renaming its keys.

``BranchedLinear`` is an ``nn.Linear`` that *adopts* the original module's ``weight`` and
``bias`` Parameter objects, so ``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``
and a base checkpoint still loads after ``inject``. Its forward (:func:`project`) is

    out = x W^T + (b + sum of the branches' scaled up-projection biases, folded per slot)
    for each branch: branch.add_into_(x, out)       # in-place addmm_ into slot views

run as one fused op with an explicit backward when a single PATT branch covers the
projection (torch: :mod:`vpetl.kernels.torch_path`, Triton: :mod:`vpetl.kernels.patt_triton`).

``SlotLayout`` says which columns of the output hold which position (q, k, v):
position-major ``[n, H, hd]`` (timm ViT and most others) or head-major ``[H, n, hd]``
(timm maxxvit with ``head_first``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, scripting
from .kernels import torch_path
from .branches import ProjectionBranch
from .options import Kernel
from .tracing import plain_path


@dataclass(frozen=True)
class SlotLayout:
    """Output columns of a projection: ``letters`` in output order (e.g. "qkv", "kv", "v");
    ``heads`` > 0 means head-major ``[H, n, hd]`` instead of position-major ``[n, w]``."""

    letters: str
    heads: int = 0

    def view(self, out2d: Tensor, letters: str) -> Tensor:
        """The columns of consecutive ``letters``: ``(M, k*w)``, or ``(M, H, hd)`` head-major."""
        n, first = len(self.letters), self.letters.index(letters[0])
        if self.heads:
            hd = out2d.shape[1] // (n * self.heads)
            return out2d.view(out2d.shape[0], self.heads, n * hd)[:, :, first * hd : (first + 1) * hd]
        w = out2d.shape[1] // n
        return out2d[:, first * w : (first + len(letters)) * w]

    def rows(self, weight: Tensor, letter: str) -> Tensor:
        """The rows of a ``(n*w, d_in)`` weight that produce slot ``letter``: a view,
        ``(w, d_in)`` or head-major ``(H, hd, d_in)`` (used to merge LoRA in place)."""
        n, i = len(self.letters), self.letters.index(letter)
        if self.heads:
            return weight.view(self.heads, n, -1, weight.shape[1])[:, i]
        w = weight.shape[0] // n
        return weight[i * w : (i + 1) * w]

    def columns(self, out_features: int, letter: str) -> Tensor:
        """Indices of slot ``letter``'s output columns, in the order of :meth:`view`'s
        flattened columns (head by head when head-major): ``(w,)`` int64."""
        n, i = len(self.letters), self.letters.index(letter)
        if not self.heads:
            w = out_features // n
            return torch.arange(i * w, (i + 1) * w)
        hd = out_features // (n * self.heads)
        return (torch.arange(self.heads)[:, None] * (n * hd) + i * hd + torch.arange(hd)).reshape(-1)

    def scatter_rows(self, pieces: dict[str, Tensor], out_features: int, rest: tuple[int, ...] = ()) -> Tensor:
        """The ``(out_features, *rest)`` tensor whose rows at slot ``c``'s output columns are
        ``pieces[c]`` (``(w, *rest)``, in :meth:`view`'s column order) and zero elsewhere; built
        with ``cat``/``stack`` only, so graph tracers and exporters record it as it is. ``rest``
        is given, not read off the pieces, whose shapes an FX tracer does not know."""
        n = len(self.letters)
        first = next(iter(pieces.values()))
        zeros = first.new_zeros((out_features // n, *rest))
        blocks = [pieces.get(c, zeros) for c in self.letters]
        if not self.heads:
            return torch.cat(blocks, 0)
        hd = out_features // (n * self.heads)
        return torch.stack([b.reshape(self.heads, hd, *rest) for b in blocks], 1).reshape(out_features, *rest)

    def runs(self, positions: str) -> list[str]:
        """Group ``positions`` held here into runs of adjacent columns (one GEMM each)."""
        runs: list[str] = []
        for c in positions:
            if c not in self.letters:
                continue
            if runs and not self.heads and self.letters.index(c) == self.letters.index(runs[-1][-1]) + 1:
                runs[-1] += c
            else:
                runs.append(c)
        return runs


class OutputSlots:
    """A projection output ``(M, n*w)`` seen through its layout; what branches add into."""

    __slots__ = ("out2d", "layout", "letters")

    def __init__(self, out2d: Tensor, layout: SlotLayout):
        self.out2d, self.layout, self.letters = out2d, layout, layout.letters

    def runs(self, positions: str) -> list[str]:
        return self.layout.runs(positions)

    def view(self, letters: str) -> Tensor:
        return self.layout.view(self.out2d, letters)


KERNEL_ATTR = "_vpetl_kernel"  # the injection's kernel choice, on the modules that run projections


def project(
    x: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch],
    kernel: Kernel = Kernel.AUTO,
) -> Tensor:
    """``x W^T + b`` plus every branch added into its slots; ``x`` is ``(..., d_in)``.

    One PATT branch whose positions all live in this projection (a fused qkv or kv Linear,
    ``nn.MultiheadAttention``'s in-projection, window attention) runs as one fused op: the
    Triton kernels when ``kernel`` (the injection's choice) selects them (:mod:`vpetl.kernels`), otherwise
    :mod:`vpetl.kernels.torch_path`. Everything else (LoRA, separate K and V Linears sharing
    one ``h``, several branches) takes :func:`project_generic`; FX/TorchScript tracing and the
    ``meta`` device take :func:`project_plain` (see :mod:`vpetl.tracing`).
    """
    if plain_path(x):
        return project_plain(x, weight, bias, layout, branches)
    x2d = x.reshape(-1, x.shape[-1])
    if len(branches) == 1 and branches[0].kind == "patt" and branches[0].fusable:
        fused = _single_patt(x2d, weight, bias, layout, branches[0], kernel)
        if fused is not None:
            return fused.view(*x.shape[:-1], weight.shape[0])
    if branches:  # a branch computing the whole projection itself (the grouped PATT of routed tasks)
        fused = branches[0].fused_projection(x2d, weight, bias, layout, kernel)
        if fused is not None:
            slots = OutputSlots(fused, layout)
            _add_branches(x, x2d, slots, branches[1:], _folded_bias(None, layout, branches[1:], weight.shape[0])[1])
            return fused.view(*x.shape[:-1], weight.shape[0])
    return project_generic(x, weight, bias, layout, branches)


def project_plain(
    x: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch]
) -> Tensor:
    """The same sum out of place with plain ops, for tracers, exporters and the ``meta``
    device (:mod:`vpetl.tracing`): ``x W^T + b + sum of branch.plain_delta(x)``."""
    out = F.linear(x, weight, bias)
    for branch in branches:
        out = out + branch.plain_delta(x, layout, weight.shape[0]).to(out.dtype)
    return out


def project_generic(
    x: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch]
) -> Tensor:
    """Any branches: the branches' constant terms are folded into the bias (one tiny vector
    op instead of another pass over the output); the matmul parts are ``addmm_`` into slot
    views, differentiated by autograd."""
    x2d = x.reshape(-1, x.shape[-1])
    bias, unfolded = _folded_bias(bias, layout, branches, weight.shape[0])
    out2d = F.linear(x2d, weight, bias)
    _add_branches(x, x2d, OutputSlots(out2d, layout), branches, unfolded)
    return out2d.view(*x.shape[:-1], weight.shape[0])


def _add_branches(x: Tensor, x2d: Tensor, slots: OutputSlots, branches: list[ProjectionBranch],
                  constants: list[tuple[str, Tensor]]) -> None:
    """Every branch's matmul part added into ``slots`` in place, then the ``(letter, term)``
    constants that were not folded into the bias."""
    for branch in branches:
        branch.add_into_(x, x2d, slots)
    for letter, term in constants:
        view = slots.view(letter)
        view.add_(term.to(view.dtype).view(view.shape[1:]))


def _single_patt(x2d: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout, branch,
                 kernel: Kernel) -> Tensor | None:
    """The fused PATT projection ``(M, N)``: Triton or torch per :func:`vpetl.kernels.use_triton`;
    None when this call is not one fused op (the generic path then runs)."""
    device_type = x2d.device.type
    triton = kernels.use_triton(kernel, device_type)  # first: "triton" where it cannot run raises
    if branch._consumers != 1 or not set(branch.positions) <= set(layout.letters) or x2d.shape[0] == 0:
        return None  # e.g. separate K and V Linears sharing one h: project_generic caches h
    if kernels.hooked(branch.down, branch.up):
        return None  # hooks on the branch's Linears must fire: the fused op does not call them
    params = [branch.down.weight, branch.down.bias, branch.up.weight, branch.up.bias]
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = x2d.dtype
        if any(t is not None and t.dtype != dtype for t in (weight, bias, *params)):
            return None
    if not dtype.is_floating_point:
        return None
    scale, act = float(branch.scale), branch.activation.value
    if triton:
        ops = kernels.triton_ops()
        triton = (
            dtype in ops.SUPPORTED_DTYPES
            and branch.down.weight.shape[0] <= ops.MAX_RANK
            and weight.shape[0] % (len(layout.letters) * max(layout.heads, 1)) == 0
            and (kernels.configured(kernel) is not Kernel.AUTO or _self_test(ops, x2d.device, dtype, act))
        )
    tensors = [None if t is None else t.to(dtype) for t in (x2d, weight, bias, *params)]
    branch._mark_called()
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if triton:
            return ops.patt_project(*tensors, slot_map(ops, layout, weight.shape[0], branch, x2d.device), scale, act)
        runs = _runs(layout, branch)
        return torch_path.patt_project_torch(*tensors, layout, runs, scale, act)


_RUNS: dict = {}


def _runs(layout: SlotLayout, branch) -> list[tuple[str, slice]]:
    """``(letters, up rows)`` per group of adjacent K/V columns of this layout (cached)."""
    key = (layout, branch.positions, tuple((c, s.start, s.stop) for c, s in branch._rows.items()))
    found = _RUNS.get(key)
    if found is None:
        rows = branch._rows
        found = _RUNS[key] = [
            (letters, slice(rows[letters[0]].start, rows[letters[-1]].stop))
            for letters in layout.runs(branch.positions)
        ]
    return found


_SLOT_MAPS: dict = {}


def slot_map(ops, layout: SlotLayout, out_features: int, branch, device: torch.device):
    """Which output column each up-projection row feeds (and back), cached per layout."""
    key = (layout, out_features, tuple((c, s.start, s.stop) for c, s in branch._rows.items()), device)
    found = _SLOT_MAPS.get(key)
    if found is None:
        rows = torch.full((out_features,), -1, dtype=torch.int64)
        cols = []
        for c, span in branch._rows.items():
            where = layout.columns(out_features, c)
            rows[where] = torch.arange(span.start, span.stop)
            cols.append(where)
        up_rows = torch.cat([torch.arange(s.start, s.stop) for s in branch._rows.values()])
        order = torch.cat(cols)[torch.argsort(up_rows)]
        found = ops.SlotMap(rows.to(device=device, dtype=torch.int32), order.to(device=device, dtype=torch.int32))
        _SLOT_MAPS[key] = found
    return found


_SELF_TESTS: dict = {}


def _self_test(ops, device: torch.device, dtype: torch.dtype, activation: str) -> bool:
    """Under kernel="auto", run the kernels once per (device, dtype, activation) on a small
    problem against the reference before trusting them; a failure (compiler error on an
    unknown GPU, wrong result) warns once and sends "auto" to the torch path."""
    key = (device, dtype, activation)
    if key not in _SELF_TESTS:
        ok = False
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                ok = _run_self_test(ops, device, dtype, activation)
            if not ok:
                raise RuntimeError("the fused result differs from the reference")
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure means: do not use Triton under auto
            kernels.disable_auto(error)
        _SELF_TESTS[key] = ok
    return _SELF_TESTS[key]


def _run_self_test(ops, device: torch.device, dtype: torch.dtype, activation: str) -> bool:
    """PATT-16 on K/V of a 32-wide qkv, 40 tokens: output and all gradients vs the reference."""
    from .kernels.reference import patt_reference

    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(40, 32), (96, 32), (96,), (16, 32), (16,), (64, 16), (64,)]
    args = [(torch.randn(s, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    fake_branch = type("Rows", (), {"_rows": {"k": slice(0, 32), "v": slice(32, 64)}})()
    out = ops.patt_project(*args, slot_map(ops, SlotLayout("qkv"), 96, fake_branch, device), 0.8, activation)
    grads = torch.autograd.grad(out.float().square().sum(), args)
    leaves = [a.detach().float().requires_grad_() for a in args]
    ref = patt_reference(*leaves, 0.8, "kv", "qkv", 0, activation)
    refs = torch.autograd.grad(ref.square().sum(), leaves)
    tol = 1e-2 if dtype == torch.float32 else 6e-2
    return all(
        torch.allclose(a.float(), b, rtol=tol, atol=tol * (b.abs().max().item() or 1.0))
        for a, b in zip((out, *grads), (ref, *refs))
    )


def _folded_bias(
    bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch], out_features: int
) -> tuple[Tensor | None, list[tuple[str, Tensor]]]:
    """Base bias with the branches' constant terms folded in per slot; the terms that
    cannot be folded (no base bias, head-major layout) are returned to add separately."""
    extras = [(c, t) for b in branches for c in layout.letters if (t := b.bias_for(c)) is not None]
    if not extras:
        return bias, []
    if bias is None or layout.heads:
        return bias, extras
    w = out_features // len(layout.letters)
    pieces = []
    for i, c in enumerate(layout.letters):
        piece = bias[i * w : (i + 1) * w]
        for letter, term in extras:
            if letter == c:
                piece = piece + term.to(piece.dtype)
        pieces.append(piece)
    return torch.cat(pieces), []


class BranchedLinear(nn.Linear):
    """``nn.Linear`` owning the original weight/bias Parameters plus attached branches.

    The branches are registered on the attention module that owns this projection (one
    PATT branch may feed several projections); here they are plain references.
    """

    __jit_unused_properties__ = ["base"]  # torch.jit.script compiles properties unless told

    def __init__(self, base: nn.Linear, layout: SlotLayout, branches: list[ProjectionBranch],
                 kernel: Kernel = Kernel.AUTO):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # the raw Parameters (keys stay); a base whose class vpetl derived to read them as an
        # effective weight (SSF) transforms them in forward through ``_vpetl_effective``
        self.weight = base._parameters["weight"]
        self.register_parameter("bias", base._parameters.get("bias"))
        for name, child in base._modules.items():  # branches registered on the base (vpetl_ssf): keys stay
            self.add_module(name, child)
        self.layout = layout
        self._branches: list[ProjectionBranch] = list(branches)
        self.kernel = kernel
        object.__setattr__(self, "_base", base)  # not a submodule (keys stay): vpetl.unload restores it

    @property
    def base(self) -> nn.Linear:
        return self._base

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # see vpetl.scripting
            return scripting.projection_sum(x, self.weight, self.bias, self._vpetl_script_tensors,
                                            self._vpetl_script_ints)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        weight, bias, base = self.weight, self.bias, self._base
        effective = getattr(type(base), "_vpetl_effective", None)  # SSF: gamma * W, gamma * b + beta
        if effective is not None:
            weight, bias = effective(base, "weight", weight), effective(base, "bias", bias)
        return project(x, weight, bias, self.layout, self._branches, self.kernel)

    def __prepare_scriptable__(self) -> "BranchedLinear":
        """Called by ``torch.jit.script``: store the branches' plan (:mod:`vpetl.scripting`)."""
        tensors, ints = scripting.projection_plan(self._branches, self.layout, self.out_features)
        scripting.store_plan(self, tensors, ints)
        return self

    def extra_repr(self) -> str:
        kinds = ", ".join(b.kind for b in self._branches)
        return f"{super().extra_repr()}, slots={self.layout.letters!r}, branches=[{kinds}]"


def adoptable(module: nn.Module) -> bool:
    """True for a plain ``nn.Linear`` (or a subclass that keeps Linear's forward)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
