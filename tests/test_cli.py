"""The ``vpetl`` command: params (exact counts), targets, inspect, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

import vpetl
from conftest import tiny_vit
from vpetl.cli import human_bytes, main

TINY = "vit_tiny_patch16_224"  # d = 192, 12 blocks; counted on the meta device, never run
D, BLOCKS, CLASSES = 192, 12, 10
HEAD = D * CLASSES + CLASSES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpetl", *args], capture_output=True, text=True, timeout=120)


def table(out: str) -> dict[str, list[str]]:
    """Rows of the params table by method (the first cell)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:] if line.strip()}


def count(cells: list[str]) -> int:
    return int(cells[0].replace(",", ""))


def test_params_bapat_exact_count_subprocess():
    proc = run_cli("params", TINY, "--method", "bapat", "--d-bottle", "8", "--num-classes", str(CLASSES))
    assert proc.returncode == 0, proc.stderr
    adapter = 2 * D * 64 + 64 + D  # down d->64 and up 64->d, both with bias
    patt = 3 * D * 8 + 8 + 2 * D  # W_down d->8 (+b), W_up 8->2d (+b)
    rows = table(proc.stdout)
    assert count(rows["bapat"]) == BLOCKS * (adapter + patt) + HEAD
    base = sum(p.numel() for p in timm.create_model(TINY, num_classes=CLASSES).parameters())
    assert int(rows["bapat"][2].replace(",", "")) == base + BLOCKS * (adapter + patt)  # total after injection
    assert f"{base:,} parameters" in proc.stdout


def test_params_all_methods(capsys):
    assert main(["params", TINY, "--method", "all", "--num-classes", str(CLASSES)]) == 0
    rows = table(capsys.readouterr().out)
    assert set(rows) == set(vpetl.METHODS)
    base = sum(p.numel() for p in timm.create_model(TINY, num_classes=CLASSES).parameters())
    assert count(rows["linear"]) == HEAD
    assert count(rows["full"]) == base
    assert count(rows["lora"]) == BLOCKS * 4 * D * 16 + HEAD  # Q and V pairs, no bias
    assert count(rows["adapter"]) == BLOCKS * (2 * D * 64 + 64 + D) + HEAD
    assert count(rows["patt"]) == BLOCKS * (3 * D * 128 + 128 + 2 * D) + HEAD
    assert count(rows["vpt"]) == 10 * D + HEAD  # shallow, 10 prompts
    assert "positions:" in " ".join(rows["tune"])  # every position the model has


def test_params_options_and_no_head(capsys):
    assert main(["params", TINY, "--method", "lora", "--positions", "q", "k", "v", "--d-bottle", "4", "--no-head"]) == 0
    assert count(table(capsys.readouterr().out)["lora"]) == BLOCKS * 3 * 2 * D * 4


def test_params_all_reports_methods_that_do_not_apply(capsys):
    assert main(["params", "botnet26t_256", "--method", "all"]) == 0  # attention vpetl cannot adapt
    out = capsys.readouterr().out
    rows = table(out)
    assert "cannot adapt" in " ".join(rows["patt"]) and " ".join(rows["adapter"]) == "- - - same as patt"
    assert count(rows["linear"]) == 2048 * 1000 + 1000


def test_targets_lists_sites_mlps_and_head(capsys):
    assert main(["targets", TINY]) == 0
    out = capsys.readouterr().out
    for i in range(BLOCKS):
        assert f"blocks.{i}.attn  " in out and f"blocks.{i}.vpetl_adapter" in out
    assert "fused-qkv" in out and f"q={D} k={D} v={D}" in out
    assert "attention-like modules skipped (0)" in out and "head: head" in out


def test_targets_shows_skipped_modules_with_reason(capsys):
    assert main(["targets", "botnet26t_256"]) == 0
    out = capsys.readouterr().out
    assert "attention sites (0)" in out and "stages.2.1.self_attn" in out
    assert "BottleneckAttn  its qkv projection is not an nn.Linear called as a module" in out


def test_targets_torchvision_video(capsys):
    assert main(["targets", "swin3d_t"]) == 0
    out = capsys.readouterr().out
    assert "features.0.0.attn" in out and "ShiftedWindowAttention3d" in out and "features.6.1.vpetl_adapter" in out


@pytest.fixture(scope="module")
def delta_file(tmp_path_factory):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=8)
    path = vpetl.save_delta(model, tmp_path_factory.mktemp("cli") / "bapat.safetensors")
    return path, vpetl.delta_state_dict(model)


def test_inspect_text(delta_file, capsys):
    path, tensors = delta_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    assert "method       bapat" in out and f"written by vpetl {vpetl.__version__}" in out
    assert "d_bottle=8" in out and "VisionTransformer" in out
    assert f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values, {nbytes:,} bytes" in out
    assert "F32 (" in out and human_bytes(nbytes) in out


def test_inspect_json_and_tensor_list(delta_file, tmp_path, capsys):
    path, tensors = delta_file
    assert main(["inspect", str(path), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "bapat" and info["config"]["methods"][0] == {**info["config"]["methods"][0], "name": "patt", "d_bottle": 8}
    assert info["tensors"]["count"] == len(tensors)
    assert {t["name"] for t in info["tensor_list"]} == set(tensors)
    model = vpetl.inject(tiny_vit(), "lora")
    half = vpetl.save_delta(model, tmp_path / "lora.safetensors", dtype=torch.bfloat16)
    assert main(["inspect", str(half)]) == 0
    assert "BF16 (" in capsys.readouterr().out


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2**20) == "3.0 MiB"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vpetl: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["params", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
        (["params", "vit_tiny_patch16_22"], "did you mean vit_tiny_patch16_224"),
        (["params", TINY, "--method", "nope"], "unknown method 'nope'"),
        (["params", TINY, "--method", "linear", "--d-bottle", "4"], "does not apply to method 'linear'"),
        (["params", TINY, "--method", "patt", "--variant", "no_input"], "needs tokens="),
        (["params", TINY, "--method", "tune"], "needs positions"),
        (["targets", "timmx:vit"], "unknown model library 'timmx'"),
    ],
)
def test_bad_input_is_one_line_exit_1(args, message, capsys):
    assert main(args) == 1
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err) and captured.out == ""


def test_bad_files_are_one_line_exit_1(delta_file, tmp_path, capsys):
    path, _ = delta_file
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    cases = [(tmp_path, "is a directory"), (tmp_path / "missing.safetensors", "does not exist"),
             (truncated, "truncated"), (junk, "not a safetensors file")]
    for target, message in cases:
        assert main(["inspect", str(target)]) == 1
        assert message in one_error_line(capsys.readouterr().err)


def test_argparse_errors_exit_2(capsys):
    for args in (["params", TINY, "--d-bottle", "0"], ["params", TINY, "--num-classes", "-1"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_error_subprocess_has_no_traceback(tmp_path):
    proc = run_cli("inspect", str(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "is a directory" in one_error_line(proc.stderr)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("params", "targets", "inspect"))


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(vpetl.METHODS)
    assert rows["bapat"]["options"]["d_bottle"] == 128 and not rows["bapat"]["mergeable"]
    assert rows["lora"]["mergeable"] and rows["lora"]["options"]["d_bottle"] == 16
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in vpetl.METHODS) and "merges exactly" in text


def test_inspect_several_deltas_says_whether_they_load_as_tasks(tmp_path, capsys):
    vpetl.save_delta(vpetl.inject(tiny_vit(), "bapat", d_bottle=4), tmp_path / "digits.safetensors")
    vpetl.save_delta(vpetl.inject(tiny_vit(num_classes=5), "lora", d_bottle=4), tmp_path / "fashion.safetensors")
    vpetl.save_delta(vpetl.inject(tiny_vit(), "ssf"), tmp_path / "ssf.safetensors")
    assert main(["inspect", str(tmp_path / "digits.safetensors"), str(tmp_path / "fashion.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "digits   bapat" in out and "fashion  lora" in out and "can be loaded as tasks of one model" in out
    assert main(["inspect", str(tmp_path / "digits.safetensors"), str(tmp_path / "ssf.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["one_model"] and "ssf (ssf) cannot be routed per sample" in info["problems"][0]
    assert [r["routable"] for r in info["tasks"]] == [True, False] and len(info["files"]) == 2
