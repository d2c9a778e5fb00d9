"""What a benchmark measured: the vpetl checkout's commit and any uncommitted source changes, and
the machine it ran on."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_state() -> dict[str, Any]:
    """``git_commit`` (short HEAD of the checkout vpetl was imported from, None outside git),
    ``src_uncommitted`` (changed files under src/: they were measured too) and ``vpetl_path``."""
    import vpetl  # here, not at module import: train_step.py imports this before its sys.path fix

    package = Path(vpetl.__file__).resolve().parent
    root = package.parent.parent  # src/vpetl/__init__.py -> checkout
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=10).stdout

        dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
        return {"git_commit": git("rev-parse", "--short", "HEAD").strip(), "src_uncommitted": dirty,
                "vpetl_path": str(package)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "src_uncommitted": None, "vpetl_path": str(package)}


def machine_state(device: str) -> dict[str, Any]:
    """Date (UTC), machine, processor, cores, torch threads, device and its name, Python version."""
    import datetime as dt
    import os
    import platform

    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(), "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "python": platform.python_version(),
    }


def describe(state: dict[str, Any]) -> str:
    """``vpetl at abc1234`` plus the uncommitted files, for a results header."""
    text = f"vpetl at {state['git_commit'] or 'an unknown commit'}"
    if state["src_uncommitted"]:
        text += " + uncommitted " + ", ".join(state["src_uncommitted"])
    return text
