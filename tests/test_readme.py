"""The README quickstart runs exactly as written (ViT-S/16 at 224 px, random weights)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(b for b in blocks if "save_delta" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(quickstart, str(README), "exec"), {})
    assert (tmp_path / "bapat64.safetensors").stat().st_size > 0
