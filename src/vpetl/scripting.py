"""``torch.jit.script`` of an injected model: the branches as flat lists TorchScript compiles.

TorchScript cannot follow vpetl's eager forwards (branch objects, layouts, kernel choice).
When ``torch.jit.script`` prepares a module (``__prepare_scriptable__``), each vpetl module
that adds branches stores a *plan*: a ``List[Tensor]`` holding the branches' own Parameter
objects (shared, not copied: training the eager model changes the scripted one, and gradients
of the scripted model reach the same Parameters) and a ``List[int]`` of codes. Its forward
then takes, under scripting only, the functions below, which compute the same sums as
:mod:`vpetl.tracing`'s plain path:

    out = x W^T + b + sum over records r of  s_r * (act_r(src_r W_down,r^T + b_down,r) U_r^T + c_r)

One record is :data:`RECORD_TENSORS` tensors ``[tokens, W_down, b_down, W_up, b_up, rows, cols,
s]`` and :data:`RECORD_INTS` ints ``[activation, has b_down, has b_up, reads tokens]``:
``U_r``/``c_r`` are the up rows ``rows`` placed at output columns ``cols`` (zeros elsewhere);
``src_r`` is ``x`` or the learned ``tokens`` (PATT ``no_input``, broadcast over the batch). A
PATT branch is one record; LoRA is one record per position with the identity activation.
Covered: PATT (variants ``add`` and ``no_input``) and LoRA in any projection vpetl wraps as a
``BranchedLinear`` (timm attention) or re-implements (``nn.MultiheadAttention``:
:mod:`vpetl.handlers._mha_script`; torchvision window attention:
:mod:`vpetl.handlers._window_script`), prefix tokens in those and in timm ``Attention``, and
adapters beside an MLP whose forward takes one tensor. Anything else (PATT ``concat``, VPT's
hooks, ``nn.TransformerEncoderLayer``, HF's split MLPs) raises :class:`vpetl.ExportError`
naming the routes that work.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

RECORD_TENSORS = 8
RECORD_INTS = 4
ACTIVATION_CODES = {"tanh": 0, "relu": 1, "gelu": 2, "identity": 3}


def activate(h: Tensor, code: int) -> Tensor:
    """The activation of code ``code`` (:data:`ACTIVATION_CODES`)."""
    if code == 0:
        return torch.tanh(h)
    if code == 1:
        return F.relu(h)
    if code == 2:
        return F.gelu(h)
    return h


def records_sum(out: Tensor, x: Tensor, tensors: List[Tensor], ints: List[int]) -> Tensor:
    """``out`` ``(..., N)`` plus every record's term, computed from ``x`` ``(..., d)`` (module
    docstring); out of place."""
    # 8 = RECORD_TENSORS, 4 = RECORD_INTS (TorchScript reads no module-level constants)
    for i in range(len(ints) // 4):
        t = tensors[i * 8 : (i + 1) * 8]
        code = ints[i * 4 : (i + 1) * 4]
        down_w, up_w = t[1], t[3]
        source = t[0] if code[3] == 1 else x.to(down_w.dtype)
        down_b: Optional[Tensor] = t[2] if code[1] == 1 else None
        h = activate(F.linear(source, down_w, down_b), code[0])
        columns = t[6]
        dense = torch.zeros([out.shape[-1], up_w.shape[1]], dtype=up_w.dtype, device=up_w.device)
        dense = dense.index_copy(0, columns, up_w.index_select(0, t[5]))
        dense_b: Optional[Tensor] = None
        if code[2] == 1:
            dense_b = torch.zeros([out.shape[-1]], dtype=up_w.dtype, device=up_w.device)
            dense_b = dense_b.index_copy(0, columns, t[4].index_select(0, t[5]))
        out = out + (F.linear(h, dense, dense_b) * t[7]).to(out.dtype)
    return out


def projection_sum(x: Tensor, weight: Tensor, bias: Optional[Tensor], tensors: List[Tensor], ints: List[int]) -> Tensor:
    """``x W^T + b`` plus the records: a projection with branches, scripted."""
    return records_sum(F.linear(x, weight, bias), x, tensors, ints)


def prefix_keys_values(tensors: List[Tensor], ints: List[int]) -> Tuple[Tensor, Tensor]:
    """Prefix-tuning's ``P_k``, ``P_v`` ``(L, d_k)``, ``(L, d_v)`` from a prefix plan
    ``[tokens, W_down, b_down, W_up, b_up]`` / ``[activation, d_k]``."""
    kv = F.linear(activate(F.linear(tensors[0], tensors[1], tensors[2]), ints[0]), tensors[3], tensors[4])
    return kv[:, : ints[1]], kv[:, ints[1] :]


def prepend_prefix(k: Tensor, v: Tensor, tensors: List[Tensor], ints: List[int]) -> Tuple[Tensor, Tensor, int]:
    """``[P_k | K]``, ``[P_v | V]`` for ``k``, ``v`` ``(B, H, S, hd)`` from a prefix plan (see
    :func:`prefix_keys_values`), and the prefix length ``L``."""
    prefix_k, prefix_v = prefix_keys_values(tensors, ints)
    length, batch, heads, head_dim = prefix_k.shape[0], k.shape[0], k.shape[1], k.shape[3]
    prefix_k = prefix_k.to(k.dtype).reshape(length, heads, head_dim).transpose(0, 1).unsqueeze(0)
    prefix_v = prefix_v.to(v.dtype).reshape(length, heads, head_dim).transpose(0, 1).unsqueeze(0)
    k = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
    return k, v, length


# ----------------------------------------------------------------------------- building plans
# (plain Python, run by ``__prepare_scriptable__``; never compiled)


PLAN_ATTRS = ("_vpetl_script_tensors", "_vpetl_script_ints")  # plain attributes TorchScript reads


def store_plan(module, tensors: List[Tensor], ints: List[int]) -> None:
    """Give ``module`` the plan its scripted forward reads (``__prepare_scriptable__``)."""
    module.__dict__.update(zip(PLAN_ATTRS, (tensors, ints)))


def forget_plans(model) -> None:
    """Drop every stored plan (``vpetl.unload``: no reference to a branch may outlive it)."""
    for module in model.modules():
        for name in PLAN_ATTRS:
            module.__dict__.pop(name, None)


def check_ready(module) -> None:
    """Refuse to script while the first-forward branch check of the model holding ``module`` is
    pending: its hooks on the root are Python that TorchScript would try to compile."""
    from .errors import ExportError
    from .record import AWAITING_FIRST_FORWARD

    for root in list(AWAITING_FIRST_FORWARD):
        if any(m is module for m in root.modules()):
            raise ExportError(
                "torch.jit.script ran before this injected model's first forward, whose check that every "
                "branch is called is still pending (hooks on the model). Run one forward first, or "
                "vpetl.verify(model, example_input), or inject with example_input=...; then script."
            )


def _index(values, device) -> Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64, device=device)


def _record(tensors: list, ints: list, *, tokens, down, up, rows, cols, scale, activation: str) -> None:
    ref = down.weight
    empty = ref.new_zeros(0)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=ref.dtype, device=ref.device)
    tensors += [
        empty if tokens is None else tokens, down.weight, empty if down.bias is None else down.bias,
        up.weight, empty if up.bias is None else up.bias, _index(rows, ref.device), _index(cols, ref.device),
        scale,
    ]
    ints += [ACTIVATION_CODES[activation], int(down.bias is not None), int(up.bias is not None),
             int(tokens is not None)]


def projection_plan(branches, layout, out_features: int) -> Tuple[List[Tensor], List[int]]:
    """The records of ``branches`` (PATT, LoRA) adding into a projection of ``layout``."""
    from .errors import ExportError

    tensors: List[Tensor] = []
    ints: List[int] = []
    for branch in branches:
        letters = [c for c in branch.positions if c in layout.letters]
        if not letters:
            continue
        cols = torch.cat([layout.columns(out_features, c) for c in letters]).tolist()
        if branch.kind == "patt":
            if branch.variant.value == "concat":
                raise ExportError("PATT variant 'concat' adds keys; torch.jit.script of it is not supported.")
            rows = [r for c in letters for r in range(branch._rows[c].start, branch._rows[c].stop)]
            tokens = branch.tokens if branch.variant.value == "no_input" else None
            _record(tensors, ints, tokens=tokens, down=branch.down, up=branch.up, rows=rows, cols=cols,
                    scale=branch.scale_value(), activation=branch.activation.value)
        elif branch.kind == "lora":
            for c in letters:
                pair = branch.pair(c)
                _record(tensors, ints, tokens=None, down=pair.down, up=pair.up, rows=range(pair.up.out_features),
                        cols=layout.columns(out_features, c).tolist(), scale=branch.scale, activation="identity")
        else:
            raise ExportError(f"torch.jit.script of a {branch.kind} branch inside a projection is not supported.")
    return tensors, ints


def adapter_plan(adapter) -> Tuple[List[Tensor], List[int]]:
    """The adapter as one record over all output columns (``s * up(act(down(x)))``)."""
    tensors: List[Tensor] = []
    ints: List[int] = []
    width = adapter.up.out_features
    _record(tensors, ints, tokens=None, down=adapter.down, up=adapter.up, rows=range(width), cols=range(width),
            scale=adapter.scale_value(), activation=adapter.activation.value)
    return tensors, ints


def prefix_plan(branch) -> Tuple[List[Tensor], List[int]]:
    """``[tokens, W_down, b_down, W_up, b_up]`` / ``[activation, d_k]`` of a prefix branch."""
    return ([branch.tokens, branch.down.weight, branch.down.bias, branch.up.weight, branch.up.bias],
            [ACTIVATION_CODES[branch.activation.value], branch.d_key])
