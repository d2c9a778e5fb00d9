"""``benchmarks/multitask.py --quick`` runs end to end on tiny shapes: every variant's outputs equal
the samples run alone through their task, and the memory figures hold exactly base + deltas.
(Its speed figures are the benchmark's business, not a test's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_its_results_and_the_outputs_match(tmp_path):
    pytest.importorskip("peft", reason="the benchmark compares with PEFT: pip install -e '.[bench]'")
    out = tmp_path / "multitask_quick"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multitask.py"), "--quick", "--no-rss",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(out.with_suffix(s).exists() for s in (".json", ".md", ".png"))
    result = json.loads(out.with_suffix(".json").read_text())["result"]
    diffs = {k: v for k, v in result["max_abs_diff_vs_alone"].items() if not k.endswith("_vs_base")}
    assert diffs and all(v < 1e-4 for v in diffs.values()), diffs
    assert result["max_abs_diff_vs_alone"]["bapat_mixed_vs_base"] > 1e-3  # the deltas do change the output
    memory = {t["target"]: t for t in result["targets"] if t["target"].startswith("memory")}
    assert len(memory) == 2 and all(t["pass"] for t in memory.values())
