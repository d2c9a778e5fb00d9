"""The fused PATT projection and adapter against the plain reference (Linear - act - Linear).

* torch path (:mod:`vpetl.kernels.torch_path`): outputs and every gradient equal the reference,
  ``torch.autograd.gradcheck`` in float64, every layout the walker produces.
* Triton kernels (:mod:`vpetl.kernels.patt_triton`): on a GPU when there is one, otherwise on
  the CPU in Triton's interpreter (slow and exact: tiny shapes only). ``TRITON_INTERPRET=1``
  takes effect only if set before ``triton.language`` is first imported, and timm (imported by
  conftest) imports it; so without a GPU the tests named ``*triton*`` run in one subprocess
  started with the variable set (:func:`test_triton_kernels_in_interpreter_subprocess`), and
  the rest of the suite keeps seeing "no Triton here".
* dispatch: ``kernel`` / ``VPETL_KERNEL``, auto = torch on CPU tensors, fallbacks without error.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st
from conftest import run_in_interpreter
from torch import nn

import vpetl
from vpetl import kernels
from vpetl.methods.adapter import AdapterBranch
from vpetl.methods.patt import PattBranch
from vpetl.config import AdapterConfig, Kernel, PattConfig
from vpetl.errors import ConfigError
from vpetl.kernels.reference import adapter_reference, patt_reference, slot_columns
from vpetl.projection import BranchedLinear, SlotLayout, project, project_generic

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (letters, heads, positions): position-major qkv (timm ViT, Swin, MHA), head-major qkv
# (maxxvit head_first, TinyViT), a kv Linear (GCViT, PVT, MHA cross-attention)
LAYOUTS = [("qkv", 0, "kv"), ("qkv", 2, "kv"), ("kv", 0, "kv"), ("qkv", 0, "qv"), ("qkv", 3, "qkv"), ("qkv", 0, "k")]


def _problem(m, d, r, letters="qkv", heads=0, positions="kv", act="tanh", bias=True, dtype=torch.float64,
             device="cpu", scale=0.8, seed=0, consumers=1):
    """x ``(m, d)``, frozen W/b, and a PATT branch (random up-projection)."""
    gen = torch.Generator().manual_seed(seed)
    n_out = len(letters) * d
    x = torch.randn(m, d, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    weight = (torch.randn(n_out, d, generator=gen, dtype=torch.float64) * d**-0.5).to(device, dtype)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64).to(device, dtype) if bias else None
    torch.manual_seed(seed)
    branch = PattBranch(d, {c: d for c in positions}, PattConfig(d_bottle=r, positions=positions, scale=scale,
                                                                activation=act), bias=bias,
                         consumers=consumers)
    branch.to(device=device, dtype=dtype)
    return x, weight, b, branch, SlotLayout(letters, heads)


def _op(t: torch.Tensor) -> str:
    """The autograd node that produced ``t``, looking through views."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        fn = fn.next_functions[0][0]
    return fn.name() if fn is not None else "none"


def _reference(x, weight, b, branch, layout):
    """Reference output and the float64 copies of every input it was computed from."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (x, weight, b, branch.down.weight, branch.down.bias, branch.up.weight, branch.up.bias)]
    out = patt_reference(*leaves, branch.scale, branch.positions, layout.letters, layout.heads,
                         branch.activation.value)
    return out, leaves


def _check(x, weight, b, branch, layout, rtol, atol, x_shape=None, kernel=Kernel.TORCH):
    """``project`` (whatever path ``kernel`` selects) equals the reference: output and
    the gradients of x, W_down, b_down, W_up, b_up, for a random output gradient."""
    xin = x if x_shape is None else x.view(x_shape)
    out = project(xin, weight, b, layout, [branch], kernel)
    assert out.dtype == x.dtype and out.shape == (*xin.shape[:-1], weight.shape[0])
    ref, leaves = _reference(x, weight, b, branch, layout)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for p in (branch.down.weight, branch.down.bias, branch.up.weight, branch.up.bias) if p is not None]
    got = torch.autograd.grad(out, [x, *params], grad.to(out.device, out.dtype).view(out.shape))
    want = torch.autograd.grad(ref, [t for i, t in enumerate(leaves) if i in (0, 3, 4, 5, 6) and t is not None], grad)
    names = ["out", "dx", "dW_down", "db_down", "dW_up", "db_up"]
    if b is None:
        names = ["out", "dx", "dW_down", "dW_up"]
    for name, a, e in zip(names, (out.reshape(ref.shape), *got), (ref, *want)):
        scale = e.abs().max().item() or 1.0
        torch.testing.assert_close(a.double().cpu(), e.cpu(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- reference itself


def test_slot_columns_match_layout_views():
    out = torch.arange(2 * 24).view(2, 24)
    for letters, heads in (("qkv", 0), ("qkv", 2), ("kv", 0)):
        layout = SlotLayout(letters, heads)
        for c in letters:
            cols = slot_columns(letters, heads, 24, c)
            assert torch.equal(out[:, cols], layout.view(out, c).reshape(2, -1))
            assert torch.equal(layout.columns(24, c), cols)


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("letters,heads,positions", LAYOUTS)
@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
def test_torch_path_matches_reference_float64(letters, heads, positions, act):
    x, w, b, branch, layout = _problem(7, 12, 5, letters, heads, positions, act)
    _check(x, w, b, branch, layout, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("letters,heads,positions", LAYOUTS[:3])
def test_torch_path_gradcheck(letters, heads, positions):
    x, w, b, branch, layout = _problem(3, 4, 2, letters, heads, positions, bias=True)
    b.requires_grad_()  # a trainable base bias (BitFit + PATT) takes the same op
    inputs = (x, b, *branch.parameters())
    assert torch.autograd.gradcheck(lambda x, b, *p: project(x, w, b, layout, [branch]), inputs)
    x, w, _, branch, layout = _problem(3, 4, 2, letters, heads, positions, bias=False, act="gelu")
    assert torch.autograd.gradcheck(lambda x, *p: project(x, w, None, layout, [branch]), (x, *branch.parameters()))


def test_torch_path_equals_generic_path_and_skips_frozen_weight_grad():
    x, w, b, branch, layout = _problem(9, 12, 4)
    fused = project(x.view(3, 3, 12), w, b, layout, [branch])
    generic = project_generic(x.view(3, 3, 12), w, b, layout, [branch])
    torch.testing.assert_close(fused, generic, rtol=1e-12, atol=1e-12)
    assert _op(fused) == "TorchPattProjectionBackward"
    fused.sum().backward()
    assert w.grad is None and branch.up.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_low_precision_and_noncontiguous(dtype):
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    x, w, b, branch, layout = _problem(24, 16, 6, dtype=dtype)
    _check(x, w, b, branch, layout, rtol=tol, atol=tol)
    wide = torch.randn(24, 40, dtype=dtype)[:, 3:19].requires_grad_()  # row stride 40
    _check(wide, w, b, branch, layout, rtol=tol, atol=tol)


def test_torch_path_autocast_cpu():
    x, w, b, branch, layout = _problem(10, 16, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = project(x, w, b, layout, [branch])
    assert out.dtype == torch.bfloat16
    ref, _ = _reference(x, w, b, branch, layout)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    out.float().sum().backward()
    assert branch.up.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_hooks_on_branch_linears_fire():
    """The fused op computes down/up without calling the modules: with a hook registered the
    generic path runs, so the hook sees every call."""
    x, w, b, branch, layout = _problem(6, 8, 3)
    seen = []
    handle = branch.down.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    out = project(x, w, b, layout, [branch])
    assert seen == [(6, 3)] and _op(out) != "TorchPattProjectionBackward"
    handle.remove()
    assert _op(project(x, w, b, layout, [branch])) == "TorchPattProjectionBackward"


def test_generic_path_still_serves_separate_projections_and_lora():
    x, w, b, branch, _ = _problem(6, 8, 3, "k", 0, "kv", consumers=2)  # K and V in two Linears share one h
    out_k = project(x, w, b, SlotLayout("k"), [branch])
    out_v = project(x, w, b, SlotLayout("v"), [branch])
    assert _op(out_k) != "TorchPattProjectionBackward"
    ref, _ = _reference(x, torch.cat([w, w]), torch.cat([b, b]), branch, SlotLayout("kv"))
    torch.testing.assert_close(torch.cat([out_k, out_v], 1), ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- Triton kernels


def _skip_unless_triton_runs() -> None:
    if not kernels._triton_importable():
        pytest.skip("triton is not importable")
    if not CUDA and not kernels.interpreting():
        pytest.skip("no GPU: runs in test_triton_kernels_in_interpreter_subprocess (TRITON_INTERPRET=1)")


@pytest.fixture
def ops():
    """The Triton kernels module, on the GPU or (no GPU) in the interpreter."""
    _skip_unless_triton_runs()
    return kernels.triton_ops()


def test_triton_kernels_in_interpreter_subprocess():
    """Without a GPU, the Triton tests of this file in a fresh interpreter-mode process."""
    if not kernels._triton_importable():
        pytest.skip("triton is not importable")
    if CUDA or kernels.interpreting():
        pytest.skip("the Triton tests run in this process")
    run_in_interpreter(__file__, "triton and not subprocess", gpu_only_skips=True)  # the dtype sweep needs a GPU


TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# on a GPU fp32 may run in TF32 if the user allowed it; the tests keep torch's default (IEEE)


@pytest.mark.parametrize(
    "m,letters,heads,positions,act,bias",
    [(37, "qkv", 0, "kv", "tanh", True), (5, "qkv", 2, "kv", "tanh", True), (16, "kv", 0, "kv", "relu", False),
     (1, "qkv", 0, "qv", "gelu", True), (33, "qkv", 3, "qkv", "tanh", False), (8, "qkv", 0, "k", "tanh", True)],
)
def test_triton_matches_reference(ops, m, letters, heads, positions, act, bias):
    x, w, b, branch, layout = _problem(m, 24, 6, letters, heads, positions, act, bias, torch.float32, DEVICE)
    _check(x, w, b, branch, layout, rtol=TOL[torch.float32], atol=TOL[torch.float32], kernel=Kernel.TRITON)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(ops, dtype):
    x, w, b, branch, layout = _problem(19, 16, 8, dtype=dtype, device=DEVICE)
    _check(x, w, b, branch, layout, rtol=TOL[dtype], atol=TOL[dtype], kernel=Kernel.TRITON)


@pytest.mark.skipif(not CUDA, reason="dtype sweep over realistic shapes needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d,r", [(197 * 3, 768, 64), (1001, 128, 256), (49, 1024, 32)])
def test_triton_gpu_shapes(ops, dtype, m, d, r):
    x, w, b, branch, layout = _problem(m, d, r, dtype=dtype, device="cuda")
    _check(x, w, b, branch, layout, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4, kernel=Kernel.TRITON)


def test_triton_noncontiguous_3d_input_and_frozen_weight_grads(ops):
    x, w, b, branch, layout = _problem(12, 16, 4, dtype=torch.float32, device=DEVICE)
    wide = torch.randn(12, 40, device=DEVICE)[:, 5:21].requires_grad_()  # row stride 40
    _check(wide, w, b, branch, layout, rtol=2e-5, atol=2e-5, kernel=Kernel.TRITON)
    w.requires_grad_(), b.requires_grad_()  # full fine-tuning + PATT: the base gets its gradients too
    out = project(x.view(3, 4, 16), w, b, layout, [branch])
    assert out.shape == (3, 4, 48)
    (out * out).sum().backward()
    ref_out, leaves = _reference(x, w, b, branch, layout)
    (ref_out * ref_out).sum().backward()
    torch.testing.assert_close(w.grad.double().cpu(), leaves[1].grad.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double().cpu(), leaves[2].grad.cpu(), rtol=1e-4, atol=1e-4)


def test_triton_unfused_weight_grads(ops, monkeypatch):
    """Deterministic algorithms (and ranks above FUSE_DW_MAX_RANK): dW_up by torch, no atomics."""
    monkeypatch.setattr(ops, "FUSE_DW_MAX_RANK", 0)
    x, w, b, branch, layout = _problem(21, 16, 5, "qkv", 2, "kv", dtype=torch.float32, device=DEVICE)
    _check(x, w, b, branch, layout, rtol=2e-5, atol=2e-5, kernel=Kernel.TRITON)


def test_triton_zero_and_negative_scale(ops):
    for scale in (0.0, -1.5):
        x, w, b, branch, layout = _problem(9, 16, 4, dtype=torch.float32, device=DEVICE, scale=scale)
        _check(x, w, b, branch, layout, rtol=2e-5, atol=2e-5, kernel=Kernel.TRITON)


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 40), d=st.sampled_from([8, 12, 20]), r=st.integers(1, 12),
    layout=st.sampled_from(LAYOUTS), act=st.sampled_from(["tanh", "relu", "gelu"]), bias=st.booleans(),
)
def test_triton_property(m, d, r, layout, act, bias):
    _skip_unless_triton_runs()  # hypothesis and function-scoped fixtures do not mix
    letters, heads, positions = layout
    if heads and d % heads:
        heads = 2
    x, w, b, branch, lay = _problem(m, d, r, letters, heads, positions, act, bias, torch.float32, DEVICE)
    _check(x, w, b, branch, lay, rtol=3e-5, atol=3e-5, kernel=Kernel.TRITON)


@pytest.mark.parametrize("dtype,act,d_out", [(torch.float32, "relu", 16), (torch.float32, "gelu", 24),
                                             (torch.bfloat16, "relu", 16)])
def test_triton_adapter_matches_reference(ops, dtype, act, d_out):
    torch.manual_seed(0)
    adapter = AdapterBranch(16, AdapterConfig(d_bottle=8, activation=act), d_out=d_out).to(DEVICE, dtype)
    for p in adapter.parameters():
        nn.init.normal_(p, std=0.3)
    out = torch.randn(2, 7, d_out, device=DEVICE, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 7, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    y = adapter.add_to(out, x, Kernel.TRITON)
    assert _op(y) == "AdapterAddBackward"
    leaves = [t.detach().double().requires_grad_() for t in (out, x, *adapter.parameters())]
    ref = adapter_reference(*leaves, adapter.scale, act)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, [out, x, *adapter.parameters()], grad.to(dtype))
    want = torch.autograd.grad(ref, leaves, grad)
    tol = TOL[dtype]
    for a, e in zip((y, *got), (ref, *want)):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())


def test_triton_auto_adapter_keeps_torch(ops):
    adapter = AdapterBranch(8, AdapterConfig(d_bottle=4)).to(DEVICE)
    y = adapter.add_to(torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.randn(3, 8, device=DEVICE))
    assert _op(y) != "AdapterAddBackward"


# ----------------------------------------------------------------------------- models end to end


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2)


def _mha():
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True))


def _swin_attention():
    from torchvision.models import swin_transformer as tv_swin

    torch.manual_seed(0)
    return tv_swin.ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2)


@pytest.mark.parametrize("build,shape", [(_tiny_vit, (2, 3, 32, 32)), (_mha, (2, 5, 16)),
                                         (_swin_attention, (1, 6, 5, 16))], ids=["timm-vit", "mha", "swin"])
def test_injected_model_triton_equals_torch(ops, monkeypatch, build, shape):
    calls = {"patt": 0, "adapter": 0}

    def counting(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(ops, "patt_project", counting("patt", ops.patt_project))
    monkeypatch.setattr(ops, "adapter_add", counting("adapter", ops.adapter_add))
    base = build().to(DEVICE)
    x = torch.randn(*shape, device=DEVICE)
    torch_model = vpetl.inject(copy.deepcopy(base), "bapat" if build is _tiny_vit else "patt", d_bottle=8,
                               kernel="torch")
    triton_model = vpetl.inject(copy.deepcopy(base), "bapat" if build is _tiny_vit else "patt", d_bottle=8,
                                kernel="triton", example_input=x)  # every branch is called
    # the modules that run projections and adapters carry the injection's kernel, not the branches
    chosen = [m.kernel if isinstance(m, BranchedLinear) else m.__dict__["_vpetl_kernel"]
              for m in triton_model.modules() if isinstance(m, BranchedLinear) or "_vpetl_kernel" in m.__dict__]
    assert chosen and set(chosen) == {Kernel.TRITON}
    for m in triton_model.modules():
        if isinstance(m, AdapterBranch):
            nn.init.normal_(m.up.weight, std=0.1)
    for m in torch_model.modules():
        if isinstance(m, AdapterBranch):
            nn.init.normal_(m.up.weight, std=0.1)
    torch_model.load_state_dict(triton_model.state_dict())
    outs = []
    for model in (torch_model, triton_model):
        y = model(x)
        y = y[0] if isinstance(y, tuple) else y
        y.square().mean().backward()
        outs.append((y, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    blocks = 2 if build is _tiny_vit else 1
    assert calls == {"patt": 2 * blocks, "adapter": 2 * blocks if build is _tiny_vit else 0}  # verify + forward
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- dispatch


def test_auto_takes_torch_on_cpu_tensors_even_when_triton_could_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "triton_ops", lambda: pytest.fail("auto must not use Triton on CPU tensors"))
    x, w, b, branch, layout = _problem(4, 8, 2, dtype=torch.float32)
    out = project(x, w, b, layout, [branch], Kernel.AUTO)
    assert _op(out) == "TorchPattProjectionBackward"
    assert kernels.use_triton("auto", "cpu") is False
    assert kernels.use_triton("auto", "cuda") is kernels._triton_importable()


def test_env_override(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VPETL_KERNEL", "torch")
    assert kernels.configured(Kernel.TRITON) is Kernel.TORCH
    assert kernels.use_triton("triton", "cpu") is False  # the override wins over the config
    x, w, b, branch, layout = _problem(4, 8, 2, dtype=torch.float32)
    project(x, w, b, layout, [branch], Kernel.TRITON)
    monkeypatch.setenv("VPETL_KERNEL", "cuda")
    with pytest.raises(ConfigError, match="VPETL_KERNEL must be one of 'auto', 'torch', 'triton'; got 'cuda'"):
        project(x, w, b, layout, [branch], Kernel.TRITON)
    monkeypatch.setenv("VPETL_KERNEL", " Auto ")
    assert kernels.configured("torch") is Kernel.AUTO


def test_env_override_to_triton_runs_the_kernels(ops, monkeypatch):
    monkeypatch.setenv("VPETL_KERNEL", "triton")
    x, w, b, branch, layout = _problem(4, 8, 2, dtype=torch.float32, device=DEVICE)
    assert _op(project(x, w, b, layout, [branch], Kernel.TORCH)) == "PattProjectionBackward"


def test_forced_triton_where_it_cannot_run_raises(monkeypatch):
    if not kernels._triton_importable():
        pytest.skip("triton is not importable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VPETL_KERNEL", raising=False)
    x, w, b, branch, layout = _problem(4, 8, 2, dtype=torch.float32)
    with pytest.raises(ConfigError, match="kernel='triton' cannot run on cpu tensors"):
        project(x, w, b, layout, [branch], Kernel.TRITON)


def test_triton_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_available() is kernels.interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels.triton_available() is (kernels._triton_importable() and CUDA)
    assert not kernels.interpreting()


def test_triton_falls_back_without_error_where_kernels_do_not_apply(ops):
    # float64, separate K/V Linears, an empty batch: the torch paths answer, no error
    x, w, b, branch, layout = _problem(5, 8, 2, dtype=torch.float64, device=DEVICE)
    assert _op(project(x, w, b, layout, [branch], Kernel.TRITON)) == "TorchPattProjectionBackward"
    x, w, b, branch, _ = _problem(5, 8, 2, "k", 0, "kv", dtype=torch.float32, device=DEVICE, consumers=2)
    project(x, w, b, SlotLayout("k"), [branch], Kernel.TRITON)
    project(x, w, b, SlotLayout("v"), [branch], Kernel.TRITON)
    x, w, b, branch, layout = _problem(5, 8, 2, dtype=torch.float32, device=DEVICE)
    assert project(x[:0], w, b, layout, [branch], Kernel.TRITON).shape == (0, 24)


def test_triton_auto_self_test_guards_the_fast_path(ops, monkeypatch):
    """Under "auto" the kernels are checked once against the reference before use; a failure
    (say, a compiler error on an unknown GPU) warns once and "auto" keeps to torch."""
    from vpetl import projection

    device = torch.device(DEVICE)
    monkeypatch.setattr(projection, "_SELF_TESTS", {})
    monkeypatch.setattr(kernels, "_broken", False)
    with torch.inference_mode():  # the check builds its own autograd graph even here
        assert projection._self_test(ops, device, torch.float32, "tanh")
    monkeypatch.setattr(projection, "_SELF_TESTS", {})

    def broken(*args):
        raise RuntimeError("PTXAS error: simulated")

    monkeypatch.setattr(ops, "patt_project", broken)
    with pytest.warns(RuntimeWarning, match="falls back to the torch path"):
        assert not projection._self_test(ops, device, torch.float32, "tanh")
    assert kernels.use_triton("auto", "cuda") is False
