"""DDP on CPU (gloo), launched by torchrun exactly as the README says: both ranks end with the
same delta, equal to single-process training on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vpetl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def _torchrun(nproc: int, out_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(EXAMPLE), "--tiny", "--img-size", "32", "--global-batch", "8", "--steps", "4", "--lr", "0.05",
        "--optimizer", "sgd",  # AdamW's 1/sqrt(v) would amplify reduction-order rounding of tiny gradients
        "--out", str(out_dir / "delta.safetensors"), "--dump-rank-deltas", str(out_dir),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single_process_delta(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: the same script, one process, the whole global batch per step."""
    out = tmp_path_factory.mktemp("single")
    _torchrun(1, out)
    return safetensors.torch.load_file(out / "rank0.safetensors")


def test_ddp_two_ranks_match_each_other_and_single_process(tmp_path, single_process_delta):
    _torchrun(2, tmp_path / "ddp")
    rank0 = safetensors.torch.load_file(tmp_path / "ddp" / "rank0.safetensors")
    rank1 = safetensors.torch.load_file(tmp_path / "ddp" / "rank1.safetensors")
    single = single_process_delta
    initial = _initial_delta()
    assert rank0.keys() == rank1.keys() == single.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # every rank applied the same averaged step
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(rank0[n], initial[n]) for n in initial if "vpetl_patt" in n)
    saved = vpetl.delta.read_header(tmp_path / "ddp" / "delta.safetensors")  # rank 0's save_delta
    assert saved is not None


def _initial_delta() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import ddp_train
    finally:
        sys.path.pop(0)
    args = ddp_train.argparse.Namespace(
        model="vit_tiny_patch16_224", tiny=True, method="bapat", d_bottle=None, classes=10, img_size=32, seed=0,
    )
    return {k: v.detach().clone() for k, v in vpetl.delta_state_dict(ddp_train.build_model(args)).items()}


def test_fsdp2_two_ranks_equal_single_process(tmp_path, single_process_delta):
    """FSDP2 recipe (examples/fsdp2_train.py) on CPU/gloo: the delta saved on rank 0 equals the
    single-process run's."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLE.with_name("fsdp2_train.py")), "--tiny", "--img-size", "32", "--global-batch", "8",
        "--steps", "4", "--lr", "0.05", "--optimizer", "sgd", "--out", str(tmp_path / "fsdp" / "delta.safetensors"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fsdp = safetensors.torch.load_file(tmp_path / "fsdp" / "delta.safetensors")
    single = single_process_delta
    assert fsdp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(fsdp[name], single[name], rtol=1e-4, atol=1e-6)
