"""What a benchmark measured: the vpetl checkout's commit and any uncommitted source changes."""

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


def describe(state: dict[str, Any]) -> str:
    """``vpetl at abc1234`` plus the uncommitted files, for a results header."""
    text = f"vpetl at {state['git_commit'] or 'an unknown commit'}"
    if state["src_uncommitted"]:
        text += " + uncommitted " + ", ".join(state["src_uncommitted"])
    return text
