"""examples/multitask.py in smoke mode: several deltas on one tiny random backbone, a mixed stream
routed per sample, checked against every task served alone; deltas reused on a second run (from
transfer.py's folder and from its own), a non-matching delta retrained rather than reused.

Needs the ``examples`` extra's sklearn, tqdm and safetensors; ~10-15 s on 2 CPU cores."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_examples import load_example


def _run(multitask, tmp_path, *extra):
    threads = torch.get_num_threads()
    try:  # the tiny model runs fastest on 1 thread when the cores are shared; other tests keep theirs
        return multitask.main(["--smoke", "--out", str(tmp_path / "out"), "--delta-dir", str(tmp_path / "deltas"),
                               "--transfer-deltas", str(tmp_path / "transfer"), "--no-progress", "--threads", "1",
                               *extra])
    finally:
        torch.set_num_threads(threads)


def test_multitask_smoke_routes_like_each_task_alone(tmp_path):
    for name in ("sklearn", "tqdm", "safetensors"):
        pytest.importorskip(name)
    multitask = load_example("multitask")
    report = _run(multitask, tmp_path)

    tasks = {t["task"]: t for t in report["tasks"]}
    assert list(tasks) == ["digits", "parity", "digits-adaptformer"]
    assert [tasks[n]["classes"] for n in tasks] == [10, 2, 10]  # heads of different widths: a list per batch
    assert [tasks[n]["method"] for n in tasks] == ["bapat-8", "lora-4", "adapter-8"]
    for t in tasks.values():
        assert t["identical_predictions"] and t["correct"] == t["correct_alone"]
        assert t["max_abs_logit_diff"] < 1e-4
        assert t["n_test"] == 40 and 0 <= t["accuracy"] <= 1 and t["ci_low"] <= t["accuracy"] <= t["ci_high"]
        assert t["delta_source"] == "trained here" and t["delta_params"] > 0
    assert report["checks"]["identical_predictions"] and report["checks"]["sorted_route_identical"]
    assert report["stream"]["images"] == 120
    modes = {s["mode"]: s for s in report["serving"]}
    assert set(modes) == {"mixed", "sorted_shared", "per_task", "plain"}
    assert all(s["images_per_s"] > 0 for s in modes.values())
    memory = report["memory"]
    assert memory["shared_bytes"] < memory["per_task_bytes"] and memory["ratio"] > 2
    assert memory["shared_bytes"] == modes["mixed"]["param_bytes"]

    saved = json.loads((tmp_path / "out" / "multitask_demo_smoke.json").read_text())
    assert saved["config"]["smoke"] and saved["git"].keys() == {"commit", "uncommitted"}
    assert saved["machine"]["torch"] == torch.__version__
    markdown = (tmp_path / "out" / "multitask_demo_smoke.md").read_text()
    assert "| digits | digits | BAPAT-8 | 10 | 40 |" in markdown and "identical" in markdown

    # second run: digits from transfer.py's folder (its file name), the others from this script's own;
    # a transfer.py-named file of the wrong method is not reused, so that task is trained again
    deltas, transfer_dir = tmp_path / "deltas", tmp_path / "transfer"
    transfer_dir.mkdir()
    shutil.move(deltas / "digits_bapat-8.safetensors", transfer_dir / "digits_bapat-8.safetensors")
    (deltas / "digits_bapat-8.json").unlink()
    shutil.copy(deltas / "digits-adaptformer_adapter-8.safetensors", transfer_dir / "digits_adapter-8.safetensors")
    shutil.copy(deltas / "parity_lora-4.safetensors", deltas / "digits-adaptformer_adapter-8.safetensors")
    again = {t["task"]: t for t in _run(multitask, tmp_path)["tasks"]}
    assert again["digits"]["delta_source"] == "reused from examples/transfer.py"
    assert again["parity"]["delta_source"] == "reused from an earlier run of this script"
    assert again["digits-adaptformer"]["delta_source"] == "reused from examples/transfer.py"  # the right file there
    for name in tasks:
        assert again[name]["correct"] == tasks[name]["correct"] and again[name]["identical_predictions"]

    (transfer_dir / "digits_adapter-8.safetensors").unlink()  # now only the wrong file (a LoRA) is left
    third = {t["task"]: t for t in _run(multitask, tmp_path, "--tasks", "digits-adaptformer=digits:adapter-8")["tasks"]}
    assert third["digits-adaptformer"]["delta_source"] == "trained here"
    assert third["digits-adaptformer"]["correct"] == tasks["digits-adaptformer"]["correct"]  # same seed, same recipe


def test_task_specs():
    multitask = load_example("multitask")
    spec = multitask.TaskSpec.parse("parity=parity:lora-16")
    assert (spec.name, spec.dataset, spec.method.label) == ("parity", "parity", "LoRA-16")
    with pytest.raises(Exception, match="unknown dataset 'cifar'"):
        multitask.TaskSpec.parse("x=cifar:lora-4")
    with pytest.raises(Exception, match="write name=dataset:method"):
        multitask.TaskSpec.parse("digits:lora-4")
