"""The PATT branches of many tasks on one projection (vpetl.routed.RoutedPatt): the torch path
and the grouped Triton kernels (vpetl.kernels.grouped_triton) against the per-row reference.

As in ``test_kernels.py``, the tests named ``*triton*`` run on a GPU when there is one and
otherwise in one subprocess with ``TRITON_INTERPRET=1`` (tiny shapes; slow and exact).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_trainable, run_in_interpreter, tiny_vit

import vpetl
from vpetl import kernels
from vpetl.errors import ConfigError
from vpetl.kernels.reference import grouped_patt_reference, slot_columns
from vpetl.routed import RoutedPatt
from vpetl.routing import Routing

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (task, first row, end row) runs: tasks interleaved with plain-base rows (-1), one task for
# every row, a task absent from the batch, runs shorter and longer than a row tile
RUNS = {
    "mixed": [(0, 0, 5), (-1, 5, 9), (2, 9, 30), (1, 30, 33), (0, 33, 37)],
    "one_task": [(1, 0, 21)],
    "base_first": [(-1, 0, 3), (0, 3, 40), (2, 40, 41)],
}


def _branches(d, ranks, n_up, bias, dtype, seed=0):
    """``(W_d, b_d, U, b_u, s)`` leaves per task, ranks differing."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE, dtype).requires_grad_()

    return [(leaf(r, d, std=d**-0.5), leaf(r) if bias else None, leaf(n_up, r, std=r**-0.5),
             leaf(n_up) if bias else None, s) for r, s in zip(ranks, (0.8, 0.5, 1.2))]


def _stacked(branches, dtype):
    """The kernels' inputs: weights stacked and zero-padded to the largest rank (differentiable)."""
    rank = max(b[0].shape[0] for b in branches)
    wd = torch.stack([F.pad(b[0], (0, 0, 0, rank - b[0].shape[0])) for b in branches])
    bd = torch.stack([F.pad(b[1], (0, rank - b[1].shape[0])) for b in branches]) if branches[0][1] is not None else None
    up = torch.stack([F.pad(b[2], (0, rank - b[2].shape[1])) for b in branches])
    bu = torch.stack([b[3] for b in branches]) if branches[0][3] is not None else None
    return wd, bd, up, bu, torch.tensor([b[4] for b in branches], dtype=torch.float32, device=DEVICE)


def _slots(ops, letters, heads, positions, n_out):
    """Which output column each up-projection row feeds, and back (as vpetl.projection.slot_map)."""
    rows = torch.full((n_out,), -1, dtype=torch.int32)
    cols = torch.cat([slot_columns(letters, heads, n_out, c) for c in positions])
    rows[cols] = torch.arange(cols.numel(), dtype=torch.int32)
    return ops.SlotMap(rows=rows.to(DEVICE), cols=cols.to(DEVICE, torch.int32))


TOL = {torch.float32: 3e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _check_grouped(runs, letters="qkv", heads=0, positions="kv", act="tanh", bias=True, ranks=(6, 3, 8),
                   dtype=torch.float32, d=24):
    from vpetl.kernels import grouped_triton as gt
    from vpetl.kernels import patt_triton as pt

    gen = torch.Generator().manual_seed(1)
    m = runs[-1][2]
    n_out = len(letters) * d
    x = torch.randn(m, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(n_out, d, generator=gen) * d**-0.5).to(DEVICE, dtype)
    b = torch.randn(n_out, generator=gen).to(DEVICE, dtype) if bias else None
    branches = _branches(d, ranks, len(positions) * d, bias, dtype)
    seg = gt.segments(runs, len(branches), gt.block_rows(), torch.device(DEVICE))
    slots = _slots(pt, letters, heads, positions, n_out)
    out = gt.grouped_patt_project(x, weight, b, *_stacked(branches, dtype), slots, seg, act)
    task_of_row = [t for t, start, end in runs for _ in range(start, end)]
    leaves = [x] + [t for br in branches for t in br[:4] if t is not None]
    as64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(as64[1:])
    ref_branches = [tuple(next(it) if t is not None else None for t in br[:4]) + (br[4],) for br in branches]
    ref = grouped_patt_reference(as64[0], weight.double(), None if b is None else b.double(), ref_branches,
                                 task_of_row, positions, letters, heads, act)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    grad = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, as64, grad.double(), allow_unused=True)
    for i, (a, w) in enumerate(zip(got, want)):
        if w is None or not w.abs().max():  # e.g. a task absent from the batch: no gradient either way
            assert a is None or not a.abs().max(), f"input {i}: gradient where the reference has none"
            continue
        torch.testing.assert_close(a.double(), w, rtol=tol, atol=tol * w.abs().max().item(),
                                   msg=lambda msg, i=i: f"gradient of input {i}: {msg}")


@pytest.fixture
def ops():
    if not kernels.triton_available():
        pytest.skip("no GPU: runs in test_grouped_triton_in_interpreter_subprocess (TRITON_INTERPRET=1)")
    return kernels.grouped_ops()


@pytest.mark.parametrize("runs", list(RUNS))
@pytest.mark.parametrize("letters,heads,positions,act,bias", [
    ("qkv", 0, "kv", "tanh", True), ("qkv", 2, "kv", "gelu", False), ("kv", 0, "kv", "relu", True),
    ("qkv", 0, "qv", "tanh", True)])
def test_triton_grouped_matches_reference(ops, runs, letters, heads, positions, act, bias):
    _check_grouped(RUNS[runs], letters, heads, positions, act, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_grouped_half_precision(ops, dtype):
    _check_grouped(RUNS["mixed"], dtype=dtype)


def test_triton_grouped_large_rank_weight_gradients_in_torch(ops):
    """Above FUSE_DW_MAX_RANK the up-projection's gradient is computed per task with torch."""
    from vpetl.kernels import patt_triton as pt

    _check_grouped(RUNS["mixed"], ranks=(pt.FUSE_DW_MAX_RANK + 8, 5, 16))


def _patt_tasks(tmp_path):
    """Deltas of three tasks whose PATT branches share one group (ranks 8 and 4) plus LoRA."""
    specs = {"bapat": ("bapat", {"d_bottle": 8}), "patt": ("patt", {"d_bottle": 4}), "lora": ("lora", {"d_bottle": 4})}
    singles = {}
    for index, (name, (method, options)) in enumerate(specs.items()):
        model = tiny_vit(num_classes=10)
        torch.manual_seed(index)
        model.reset_classifier(10)
        vpetl.inject(model, method, train_head=True, **options)
        perturb_trainable(model, 10 + index)
        vpetl.save_delta(model, tmp_path / f"{name}.safetensors")
        singles[name] = model.eval()
    multi = tiny_vit(num_classes=10).eval()
    for name in specs:
        vpetl.load_delta(multi, tmp_path / f"{name}.safetensors", task=name)
    return singles, multi


ROUTES = {"interleaved": ["bapat", "lora", None, "patt", "lora", "bapat", "patt"],
          "sorted": ["bapat", "bapat", "patt", "patt", "lora", None, None]}


@pytest.mark.parametrize("routes", list(ROUTES))
def test_patt_tasks_of_different_ranks_share_one_group(tmp_path, routes):
    singles, multi = _patt_tasks(tmp_path)
    groups = [m for m in multi.modules() if hasattr(m, "_branches") for b in m._branches if isinstance(b, RoutedPatt)]
    assert groups and all(len(b._members) == 2 for m in groups for b in m._branches if isinstance(b, RoutedPatt))
    plain = tiny_vit(num_classes=10).eval()
    x = torch.randn(len(ROUTES[routes]), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), vpetl.route(multi, ROUTES[routes]):
        out = multi(x)
    with torch.no_grad():
        for i, task in enumerate(ROUTES[routes]):
            alone = (plain if task is None else singles[task])(x[i : i + 1])[0]
            torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-5)


def test_triton_grouped_routed_model_equals_the_torch_path(ops, tmp_path, monkeypatch):
    """The same routed model, mixed batch, with VPETL_KERNEL=triton and =torch: outputs and the
    gradients of every task's parameters agree."""
    _, multi = _patt_tasks(tmp_path)
    multi.to(DEVICE)
    routes = ROUTES["interleaved"]
    x = torch.randn(len(routes), 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    calls = []
    real = ops.grouped_patt_project
    monkeypatch.setattr(ops, "grouped_patt_project", lambda *args: calls.append(args) or real(*args))
    results, launches = {}, {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, kernel)
        multi.zero_grad()
        calls.clear()
        with vpetl.route(multi, routes):
            out = multi(x)
        out.square().sum().backward()
        results[kernel] = (out.detach(), {n: p.grad.clone() for n, p in multi.named_parameters() if p.grad is not None})
        launches[kernel] = len(calls)
    assert launches == {"torch": 0, "triton": len(multi.blocks)}  # one grouped op per attention block
    (out_t, grads_t), (out_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-4)
    assert grads_k.keys() == grads_t.keys() and any(".vpetl_patt.patt." in n for n in grads_k)
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_k[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_kernel_env_asks_for_triton_where_it_cannot_run(tmp_path, monkeypatch):
    if not kernels._triton_importable() or kernels.triton_available():
        pytest.skip("needs Triton importable and unable to run here (no GPU, no interpreter)")
    _, multi = _patt_tasks(tmp_path)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(ConfigError, match="kernel='triton' cannot run on cpu tensors"), \
            vpetl.route(multi, ["patt", "bapat"]):
        multi(torch.randn(2, 3, 32, 32))


def test_routing_runs_spans_and_tiles():
    routing = Routing(per_sample=("a", "a", None, "b", "a"))
    assert routing.runs({"a": 0, "b": 1}, 10, "here") == [(0, 0, 4), (-1, 4, 6), (1, 6, 8), (0, 8, 10)]
    assert routing.runs({"b": 0}, 5, "here") == [(-1, 0, 3), (0, 3, 4), (-1, 4, 5)]
    assert routing.span("b", 10, "here") == slice(6, 8) and routing.span("a", 10, "here") is None
    assert routing.span("c", 10, "here") == slice(0, 0)
    assert Routing(single="a").runs({"a": 0}, 7, "here") == [(0, 0, 7)]
    with pytest.raises(vpetl.errors.InjectionError, match="cannot find the batch dimension"):
        routing.runs({"a": 0}, 11, "a projection")
    if not kernels._triton_importable():
        return
    from vpetl.kernels import grouped_triton as gt

    seg = gt.segments([(0, 0, 40), (-1, 40, 45), (1, 45, 50)], 2, 16, torch.device("cpu"))
    assert seg.tiles.tolist() == [[0, 0, 16], [0, 16, 32], [0, 32, 40], [-1, 40, 45], [1, 45, 50]]
    assert seg.task_tiles.tolist() == [[0, 0, 16], [0, 16, 32], [0, 32, 40], [1, 45, 50]]
    assert [r.tolist() for r in seg.rows] == [list(range(40)), list(range(45, 50))]


def test_grouped_triton_in_interpreter_subprocess():
    """Without a GPU, the Triton tests of this file in a fresh interpreter-mode process."""
    if not kernels._triton_importable():
        pytest.skip("triton is not importable")
    if CUDA or kernels.interpreting():
        pytest.skip("the Triton tests run in this process")
    run_in_interpreter(__file__, "triton and not subprocess and not cannot_run")
