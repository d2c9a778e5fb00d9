"""The Triton kernels (single-task and grouped) compile for real NVIDIA GPUs (sm_90 H100, sm_80 A100) without one.

``test_kernels.py`` checks the arithmetic in Triton's interpreter; this module compiles every
launch the real forward and backward make, to PTX and a cubin, with Triton's own argument
specialisation (:mod:`vpetl.kernels.aot`), and checks the tile configurations against the
devices' shared memory and a generous register-spill bound (``aot.SPILL_LIMIT``): how many
bytes a tile spills is the compiler release's choice; kilobytes mean a wrong tile.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from vpetl.kernels import aot  # noqa: E402
from vpetl.kernels import patt_triton as pt  # noqa: E402

reason = aot.aot_supported()
if reason is not None:
    pytest.skip(reason, allow_module_level=True)

ORDER = ["_hidden_kernel", "_project_kernel", "_branch_bwd_kernel", "_dx_kernel"]


def _compile_all(launches, arch):
    """``{kernel: shared memory bytes}`` of every launch compiled for ``arch`` (the first
    configuration of an autotuned kernel). The fixed-tile kernels (vpetl picks their tiles,
    no autotuner) must not spill more than ``aot.SPILL_LIMIT`` bytes per thread."""
    shared = {}
    for launch in launches:
        compiled = aot.compile_launch(launch, arch)
        assert compiled.asm["cubin"], f"{launch.name}: no cubin for sm_{arch}"
        assert ".target sm_" + str(arch) in compiled.asm["ptx"]
        shared[launch.name] = compiled.metadata.shared
        if not launch.configs:
            usage = aot.resource_usage(compiled)
            assert usage.get("stack", 0) <= aot.SPILL_LIMIT, f"{launch.name} {launch.kwargs}: spills on sm_{arch}: {usage}"
    return shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", [64, 256])
def test_patt_forward_and_backward_compile_for_h100(dtype, rank):
    launches = aot.patt_launches(dtype, rank)
    assert [launch.name for launch in launches] == ORDER
    assert launches[2].kwargs["FUSE_DW"] == (rank <= 64)  # dU in the same read of dK/dV up to r = 64
    shared = _compile_all(launches, 90)
    assert max(shared.values()) <= aot.SHARED_LIMIT[90], shared


def test_gelu_fp16_patt_compiles_for_h100():
    launches = aot.patt_launches(torch.float16, 64, act="gelu")
    hidden, _, backward, _ = launches
    assert hidden.kwargs["STORE_Z"] and hidden.kwargs["ACT"] == 2 and backward.kwargs["ACT"] == 2
    shared = _compile_all(launches, 90)
    assert max(shared.values()) <= aot.SHARED_LIMIT[90], shared


def test_adapter_kernels_compile_for_h100():
    launches = aot.adapter_launches(torch.bfloat16, 64)
    assert [launch.name for launch in launches] == ORDER
    project, dx = launches[1], launches[3]
    assert project.kwargs["HAS_C"] and project.kwargs["IDENTITY"] and not project.kwargs["HAS_BASE"]
    assert not dx.kwargs["HAS_BASE"]
    shared = _compile_all(launches, 90)
    assert max(shared.values()) <= aot.SHARED_LIMIT[90], shared


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_autotune_configuration_compiles_and_one_fits(arch, dtype):
    """The autotuner drops a configuration the device cannot hold (OutOfResources), so every
    configuration must compile and, per kernel, at least one must fit; the fp32 shapes were
    chosen not to spill registers, so none may spill more than ``aot.SPILL_LIMIT`` bytes (the
    exact figure depends on the Triton release)."""
    launches = [launch for launch in aot.patt_launches(dtype, 64) if launch.configs]
    assert [launch.name for launch in launches] == ["_project_kernel", "_dx_kernel"]
    expected = len(pt.FP32_SHAPES if dtype == torch.float32 else pt.HALF_SHAPES)
    assert [len(launch.configs) for launch in launches] == [expected, expected]  # pruned to the dtype's shapes
    for launch in launches:
        fits = []
        for i in range(len(launch.configs)):
            compiled = aot.compile_launch(launch, arch, i)
            assert compiled.asm["cubin"]
            if compiled.metadata.shared <= aot.SHARED_LIMIT[arch]:
                fits.append(i)
            if dtype == torch.float32:
                usage = aot.resource_usage(compiled)
                assert usage.get("stack", 0) <= aot.SPILL_LIMIT, f"{launch.name} {launch.variants()[i]} spills: {usage}"
        assert fits, f"{launch.name}: no tile configuration fits sm_{arch}"


@pytest.mark.parametrize("dtype, rank", [(torch.float32, 16), (torch.float32, 32), (torch.float32, 128),
                                         (torch.bfloat16, 16), (torch.bfloat16, 128)])
def test_fixed_tile_kernels_do_not_spill_kilobytes_on_a100(dtype, rank):
    """vpetl picks the hidden and backward kernels' tiles itself; on sm_80 the fp32 tiles that
    suit sm_90 spilled kilobytes, so the tiles must suit both."""
    launches = [launch for launch in aot.patt_launches(dtype, rank) if not launch.configs]
    assert [launch.name for launch in launches] == ["_hidden_kernel", "_branch_bwd_kernel"]
    _compile_all(launches, 80)


GROUPED = ["_grouped_hidden_kernel", "_grouped_project_kernel", "_grouped_branch_bwd_kernel", "_grouped_dx_kernel"]


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype, rank, act", [(torch.float32, 8, "tanh"), (torch.float32, 256, "tanh"),
                                              (torch.bfloat16, 64, "tanh"), (torch.float16, 128, "gelu")])
def test_grouped_patt_forward_and_backward_compile(arch, dtype, rank, act):
    """The grouped kernels of 8 tasks (fixed tiles: the row block is the tile map's) build for
    H100 and A100, fit their shared memory and do not spill kilobytes."""
    launches = aot.grouped_launches(dtype, rank, act)
    assert [launch.name for launch in launches] == GROUPED
    assert launches[2].kwargs["FUSE_DW"] == (rank <= pt.FUSE_DW_MAX_RANK)
    assert launches[0].kwargs["STORE_Z"] == (act == "gelu")
    shared = _compile_all(launches, arch)
    assert max(shared.values()) <= aot.SHARED_LIMIT[arch], shared


def test_recording_leaves_the_kernels_launchable():
    aot.patt_launches(torch.float32, 16)
    aot.grouped_launches(torch.float32, 16, tasks=2, images=3, tokens=5, d=32)
    from vpetl.kernels import grouped_triton as gt

    kernels = (pt._hidden_kernel, pt._branch_bwd_kernel, gt._grouped_hidden_kernel, gt._grouped_project_kernel,
               gt._grouped_branch_bwd_kernel, gt._grouped_dx_kernel)
    assert all("run" not in vars(kernel) for kernel in kernels)
    assert pt._launcher.__module__ == pt.__name__
