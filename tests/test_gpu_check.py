"""benchmarks/gpu_check.sh on a machine without a GPU: it refuses cleanly, lists its steps, and its
orchestration (timeouts, failures that do not stop the run, summary.md) works with stub steps."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RESULTS = ROOT / "benchmarks" / "results"
# the script's rule for "another test file with CUDA parts" (kept in step with CUDA_PATTERN there)
CUDA_PATTERN = re.compile(
    r"torch\.cuda\.|\.cuda\(|\.to\([\"']cuda|device\s*=\s*[\"']cuda|mark\.(cuda|gpu)|requires_(cuda|gpu)"
    r"|kernel\s*=\s*[\"']triton|triton_available\("
)
MESSAGE = re.compile(r"^gpu_check: no CUDA device visible to torch \(.+\); run this on a machine with an NVIDIA GPU$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's folder first on PATH (the script runs `python`), no GPU visible."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("PYTHON", None)
    env.update(extra)
    return env


def _run(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(**extra), capture_output=True,
                          text=True, timeout=timeout)


def _gpu_check_folders(root: Path) -> set[str]:
    return {p.name for p in root.glob("gpu_check*")} if root.exists() else set()


def test_script_is_executable_and_parses():
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_gpu_fails_at_once_with_one_line_and_writes_nothing(tmp_path):
    before = _gpu_check_folders(RESULTS)
    start = time.monotonic()
    done = _run()
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and MESSAGE.match(lines[0]), done.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in lines[0]
    assert elapsed < 60  # the preflight's timeout is 40 s; importing torch takes a few
    assert _gpu_check_folders(RESULTS) == before
    # the same with the results redirected: the folder stays empty
    done = _run(GPU_CHECK_RESULTS=str(tmp_path))
    assert done.returncode == 2 and MESSAGE.match(done.stderr.strip())
    assert list(tmp_path.iterdir()) == []


def test_without_python_fails_with_the_same_message(tmp_path):
    done = _run(PYTHON=str(tmp_path / "no-such-python"), GPU_CHECK_RESULTS=str(tmp_path))
    assert done.returncode == 2 and MESSAGE.match(done.stderr.strip()), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_option_is_a_usage_error():
    done = _run("--bogus")
    assert done.returncode == 2 and "unknown option '--bogus'" in done.stderr


def test_help():
    done = _run("--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout and "--copy-to" in done.stdout


def test_dry_run_lists_every_step_with_timeouts_under_8_minutes():
    before = _gpu_check_folders(RESULTS)
    done = _run("--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for name in ("preflight", "env", "tests_kernels_shapes_fp16", "tests_kernels_shapes_bf16",
                 "tests_kernels_shapes_fp32_property", "tests_kernels_rest", "tests_other", "kernels_bench",
                 "train_step_vit", "train_step_swin3d", "summary"):
        assert re.search(rf"^\s+\S+\s+{name}\s+\d+s\s", out, re.M), f"{name} missing:\n{out}"
    assert "tests/test_kernels.py" in out
    assert re.search(r"benchmarks/kernels\.py --device cuda", out)
    assert re.search(r"benchmarks/train_step\.py --big --device cuda --amp bf16", out)
    assert "--junitxml=" in out
    others = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tests").glob("test_*.py"))
              if p.name not in ("test_kernels.py", "test_gpu_check.py") and CUDA_PATTERN.search(p.read_text())]
    for path in others:
        assert path in out, f"{path} has CUDA parts but is not run:\n{out}"
    # the test_kernels.py shards select every test exactly once
    shards = re.findall(r"tests/test_kernels\.py -k '([^']+)'", out)
    assert len(shards) == 4
    gpu_shapes = [f"test_triton_gpu_shapes[x-dtype{i}]" for i in range(3)]
    for test in gpu_shapes + ["test_triton_property", "test_triton_matches_reference[dtype1]", "test_env_override"]:
        hits = [k for k in shards if _k_matches(k, test)]
        assert len(hits) == 1, (test, hits)
    # the budget: the stage timeouts add up to the total, which stays under 8 minutes
    match = re.search(r"total timeout: (\d+) s \(sum over the (\d+) stages; worst case (\d+) s", out)
    assert match, out
    total, stages, worst = map(int, match.groups())
    stage_timeouts = [int(t) for t in re.findall(r"^\s+(?:\d+)\s+\S+\s+(\d+)s\s", out, re.M)]
    concurrent = [int(t) for t in re.findall(r"stage timeout (\d+) s", out)]
    assert total == sum(stage_timeouts) + sum(concurrent)
    assert stages == len(stage_timeouts) + len(concurrent)
    assert total < 480 and worst < 480
    assert _gpu_check_folders(RESULTS) == before


def _k_matches(expression: str, name: str) -> bool:
    """pytest's -k for these expressions: substrings joined by and/or/not and parentheses."""
    words = re.sub(r"[()]", " ", expression).split()
    python = expression
    for word in sorted(set(words) - {"and", "or", "not"}, key=len, reverse=True):
        python = re.sub(rf"\b{re.escape(word)}\b", repr(word in name), python)
    return bool(eval(python))  # noqa: S307 - our own expressions, True/False and operators only


def test_orchestration_with_stub_steps(tmp_path):
    """Without a GPU, GPU_CHECK_STUB runs the real env and summary steps, one real pytest shard
    (its GPU tests skip here) and stubs for the rest: a failing step and a hanging one (stopped by
    its timeout) do not stop the others, and summary.md lists every step's status and outputs."""
    results, copy = tmp_path / "results", tmp_path / "copy"
    stub = "tests_kernels_shapes_fp16=real,tests_kernels_rest=fail,kernels_bench=hang"
    done = _run("--copy-to", str(copy), timeout=180, GPU_CHECK_RESULTS=str(results), GPU_CHECK_STUB=stub,
                GPU_CHECK_STUB_TIMEOUT="2")
    assert done.returncode == 1, done.stdout + done.stderr
    folder = results / "gpu_check_stub-gpu"
    summary = (folder / "summary.md").read_text()
    status = dict(re.findall(r"^\| (\w+) \| ([A-Z ]+) \|", summary, re.M))
    assert status.pop("env") in ("PASS", "FAIL")  # FAIL here: torch sees no GPU, env.json says so
    assert status.pop("tests_other") in ("PASS", "SKIP")  # SKIP if no other test file touches CUDA
    assert status == {
        "tests_kernels_shapes_fp16": "PASS", "tests_kernels_shapes_bf16": "PASS",
        "tests_kernels_shapes_fp32_property": "PASS", "tests_kernels_rest": "FAIL",
        "kernels_bench": "TIMEOUT", "train_step_vit": "PASS", "train_step_swin3d": "PASS", "summary": "PASS",
    }, summary
    assert "KeyboardInterrupt" in (folder / "kernels_bench.log").read_text()  # SIGINT first
    # the real shard: 3 GPU tests selected, skipped without a GPU; its junit report is there
    assert re.search(r"^\| tests_kernels_shapes_fp16 \| PASS \| 0 \|.*\| 3 skipped, 61 deselected in ", summary, re.M)
    assert 'skipped="3"' in (folder / "tests_kernels_shapes_fp16.junit.xml").read_text()
    verdict = next(line for line in summary.splitlines() if "**FAIL**" in line)
    assert "tests_kernels_rest" in verdict and "kernels_bench" in verdict and "train_step_vit" not in verdict
    env = (folder / "env.json").read_text()
    assert '"torch"' in env and '"date_utc"' in env and '"git_commit"' in env
    assert (copy / "gpu_check_stub-gpu" / "summary.md").read_text() == summary
    assert "<<< kernels_bench: TIMEOUT" in done.stdout
