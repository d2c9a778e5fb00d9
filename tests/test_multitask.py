"""Many tasks on one frozen backbone (vpetl.multitask): every sample routed to its own task equals
that sample run through a model that has only its task, on timm ViT, torchvision Swin3D,
torchvision ViT (MHA) and HF ViT; mixed-batch training gives the per-task gradients."""

from __future__ import annotations

import copy

import pytest
import safetensors
import torch
from conftest import perturb_trainable, tiny_hf_vit, tiny_swin3d, tiny_vit
from torchvision.models.vision_transformer import VisionTransformer

import vpetl


def tv_vit(num_classes: int = 10):
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _with_head(build, classes):
    """The same base (same seed) with a head of ``classes`` outputs, the head seeded apart."""
    model = build()
    if classes is None:
        return model
    torch.manual_seed(classes)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(classes)
    elif hasattr(model, "heads"):
        model.heads.head = torch.nn.Linear(model.heads.head.in_features, classes)
    elif hasattr(model, "classifier"):
        model.classifier = torch.nn.Linear(model.classifier.in_features, classes)
        model.config.num_labels = classes
    else:
        model.head = torch.nn.Linear(model.head.in_features, classes)
    return model


FAMILIES = {
    "timm": (lambda: tiny_vit(num_classes=10), (3, 32, 32)),
    "swin3d": (lambda: tiny_swin3d(num_classes=10), (3, 4, 32, 32)),
    "tv_vit": (lambda: tv_vit(10), (3, 32, 32)),
    "hf_vit": (lambda: tiny_hf_vit(num_classes=10), (3, 32, 32)),
}
# name -> (method, options, head classes: None keeps the base head's 10, train_head)
TASKS = {
    "bapat": ("bapat", {"d_bottle": 8}, None, True),
    "lora": ("lora", {"d_bottle": 4}, 5, True),
    "adapter": ("adapter", {"d_bottle": 6}, None, False),  # no head of its own: the base head
}


def _trained_deltas(build, tmp_path, tasks=TASKS, sequential=False):
    """Save one delta per task, trained (perturbed) on the same base; return the single-task models."""
    singles = {}
    for index, (name, (method, options, classes, train_head)) in enumerate(tasks.items()):
        model = _with_head(build, classes)
        opts = dict(options, placement="sequential") if sequential and method == "adapter" else options
        vpetl.inject(model, method, train_head=train_head, **opts)
        perturb_trainable(model, 10 + index)
        vpetl.save_delta(model, tmp_path / f"{name}.safetensors")
        singles[name] = model.eval()
    return singles


def _multi(build, tmp_path, names):
    model = build().eval()
    for name in names:
        vpetl.load_delta(model, tmp_path / f"{name}.safetensors", task=name)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_equals_each_sample_in_its_own_task(family, tmp_path):
    build, shape = FAMILIES[family]
    singles = _trained_deltas(build, tmp_path)
    model = _multi(build, tmp_path, TASKS)
    assert vpetl.tasks(model) == list(TASKS)
    plain = build().eval()
    routes = ["bapat", "lora", None, "adapter", "lora", "bapat"]
    x = torch.randn(len(routes), *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), vpetl.route(model, routes):
        out = _logits(model(x))
    assert isinstance(out, list) and len(out) == len(routes)  # heads of 10 and 5 outputs
    with torch.no_grad():
        for i, task in enumerate(routes):
            alone = _logits((plain if task is None else singles[task])(x[i : i + 1]))[0]
            torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-5)
        for task, single in singles.items():  # one task for the whole batch
            with vpetl.route(model, task):
                torch.testing.assert_close(_logits(model(x)), _logits(single(x)), rtol=1e-5, atol=1e-5)
        with vpetl.route(model, None):
            torch.testing.assert_close(_logits(model(x)), _logits(plain(x)), rtol=1e-5, atol=1e-5)


def test_separate_k_v_linears_compute_each_gathered_task_hidden_once(tmp_path):
    """HF ViT's k and v Linears share one PATT hidden per task, also when the task's samples are
    gathered from an interleaved batch."""
    build, shape = FAMILIES["hf_vit"]
    tasks = {k: TASKS[k] for k in ("bapat", "lora")}
    _trained_deltas(build, tmp_path, tasks)
    model = _multi(build, tmp_path, tasks)
    downs = [m for n, m in model.named_modules() if n.endswith("vpetl_patt.bapat.down")]
    calls = []
    for down in downs:
        down.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), vpetl.route(model, ["bapat", "lora", "bapat", "lora"]):
        model(torch.randn(4, *shape))
    assert len(downs) == 2 and len(calls) == 2  # one per layer, not one per k and v Linear


def test_equal_head_widths_give_one_tensor_and_sequential_adapters_route(tmp_path):
    tasks = {k: TASKS[k] for k in ("bapat", "adapter")}
    singles = _trained_deltas(FAMILIES["timm"][0], tmp_path, tasks, sequential=True)
    model = _multi(FAMILIES["timm"][0], tmp_path, tasks)
    routes = ["adapter", "bapat", "adapter"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), vpetl.route(model, routes):
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
    with torch.no_grad():
        for i, task in enumerate(routes):
            torch.testing.assert_close(out[i], singles[task](x[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def test_save_delta_of_a_task_writes_the_file_it_was_loaded_as(tmp_path):
    _trained_deltas(FAMILIES["timm"][0], tmp_path)
    model = _multi(FAMILIES["timm"][0], tmp_path, TASKS)
    for name in TASKS:
        vpetl.save_delta(model, tmp_path / f"{name}.again.safetensors", task=name)
        with safetensors.safe_open(tmp_path / f"{name}.safetensors", "pt") as a, \
                safetensors.safe_open(tmp_path / f"{name}.again.safetensors", "pt") as b:
            assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open)


def test_mixed_batch_training_gives_each_task_its_own_gradients(tmp_path):
    build = FAMILIES["timm"][0]
    tasks = {k: TASKS[k] for k in ("bapat", "adapter")}
    singles = _trained_deltas(build, tmp_path, tasks)
    model = _multi(build, tmp_path, tasks)
    routes = ["bapat", "adapter", "adapter", "bapat"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 2, 3, 4])
    with vpetl.route(model, routes):
        loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="sum")
    loss.backward()
    names = dict(model.named_parameters())
    for task, single in singles.items():
        rows = [i for i, t in enumerate(routes) if t == task]
        torch.nn.functional.cross_entropy(single(x[rows]), labels[rows], reduction="sum").backward()
        for local, param in single.named_parameters():
            if not param.requires_grad:
                continue
            if local.startswith("head."):
                shared = names[f"vpetl_heads.{task}.{local[5:]}"] if task == "bapat" else names[local]
            else:
                marker = next(m for m in (".vpetl_patt.", ".vpetl_adapter.") if m in local)
                shared = names[local.replace(marker, f"{marker}{task}.", 1)]
            if task == "adapter" and local.startswith("head."):
                continue  # the base head is frozen in the multi-task model (the adapter task trains none)
            where = f"{task} {local}"
            torch.testing.assert_close(shared.grad, param.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(names[n].grad is None for n in frozen)


def test_unload_restores_the_plain_base(tmp_path):
    build = FAMILIES["timm"][0]
    _trained_deltas(build, tmp_path)
    model = _multi(build, tmp_path, TASKS)
    reference = build()
    vpetl.unload(model)
    assert vpetl.tasks(model) == [] and model.state_dict().keys() == reference.state_dict().keys()
    assert {type(m) for m in model.modules()} == {type(m) for m in reference.modules()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_summary_lists_the_tasks(tmp_path):
    _trained_deltas(FAMILIES["timm"][0], tmp_path)
    model = _multi(FAMILIES["timm"][0], tmp_path, TASKS)
    text = str(vpetl.summary(model))
    for name, (method, *_rest) in TASKS.items():
        assert f"task {name}: {method}" in text


def test_clear_errors(tmp_path):
    build = FAMILIES["timm"][0]
    _trained_deltas(build, tmp_path)
    model = _multi(build, tmp_path, ["bapat", "lora"])
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(vpetl.ConfigError, match=r"unknown task\(s\) \['nope'\]; this model has \['bapat', 'lora'\]"), \
            vpetl.route(model, ["bapat", "nope", None]):
        pass
    with pytest.raises(vpetl.InjectionError, match="given 2 tasks .* cannot find the batch dimension"), \
            vpetl.route(model, ["bapat", "lora"]):
        model(x)
    with pytest.raises(vpetl.InjectionError, match=r"carries the tasks \['bapat', 'lora'\]; run it inside"):
        model(x)
    with pytest.raises(vpetl.InjectionError, match="task 'lora' is already loaded"):
        vpetl.load_delta(model, tmp_path / "lora.safetensors", task="lora")
    with pytest.raises(vpetl.InjectionError, match="save one with vpetl.save_delta"):
        vpetl.save_delta(model, tmp_path / "all.safetensors")
    with pytest.raises(vpetl.InjectionError, match="has no task 'x'"):
        vpetl.save_delta(model, tmp_path / "x.safetensors", task="x")
    wider = tiny_vit(embed_dim=48)
    with pytest.raises(vpetl.DeltaMismatchError, match="does not fit .* architecture"):
        vpetl.load_delta(wider, tmp_path / "lora.safetensors", task="lora")
    assert vpetl.tasks(wider) == [] and "_vpetl" not in wider.__dict__
    ssf = vpetl.inject(build(), "ssf")
    vpetl.save_delta(ssf, tmp_path / "ssf.safetensors")
    with pytest.raises(vpetl.ConfigError, match=r"uses ssf\(\), which cannot be routed per sample"):
        vpetl.load_delta(model, tmp_path / "ssf.safetensors", task="ssf")
    assert vpetl.tasks(model) == ["bapat", "lora"]  # a refused load leaves the tasks as they were
    with torch.no_grad(), vpetl.route(model, "lora"):
        model(x)
    injected = vpetl.inject(build(), "patt")
    with pytest.raises(vpetl.InjectionError, match="not loaded as tasks; call vpetl.unload"):
        vpetl.load_delta(injected, tmp_path / "lora.safetensors", task="lora")


def test_a_deep_copy_routes_on_its_own(tmp_path):
    _trained_deltas(FAMILIES["timm"][0], tmp_path)
    model = _multi(FAMILIES["timm"][0], tmp_path, ["bapat", "lora"])
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vpetl.route(clone, ["lora", "bapat"]):
        out = clone(x)
    with torch.no_grad(), vpetl.route(model, ["lora", "bapat"]):
        torch.testing.assert_close(model(x)[0], out[0])
