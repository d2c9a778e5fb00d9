"""An injected model inside the training frameworks users already have: Hugging Face ``Trainer``,
PyTorch Lightning, and both frameworks' gradient (activation) checkpointing.

Tiny random-weight models on CPU. What is checked: the optimizer sees the delta only, the frozen
base stays bit-exact, every delta tensor moves, checkpoints hold the delta, resume restores it,
and ``save_delta`` / ``load_delta`` onto a fresh base reproduce the trained model exactly.

HF resume (transformers 5.x): ``save_pretrained`` (so every Trainer checkpoint) writes the hub's
original key names (``vit.layers.0.attention.q_proj.weight`` is written as
``vit.encoder.layer.0.attention.attention.query.weight``, and ``vit.layers.0.vpetl_adapter.*`` as
``vit.encoder.layer.0.vpetl_adapter.*``),
but ``Trainer._load_from_checkpoint`` loads that file with a plain ``load_state_dict(strict=False)``
that does not rename them back. So a plain ViT resumes with its
encoder layers at their fresh init, and vpetl's branches, which live in those layers, are not
restored either. vpetl's keys are renamed exactly like their neighbours, so the resume tests
assert that vpetl is never worse than plain HF (every tensor HF restores for the plain model is
restored for the injected one) and that the pattern of saving the delta into each checkpoint
(``DeltaCheckpoint`` below) resumes bit-exact.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vpetl
from conftest import tiny_vit

CLASSES, R, STEPS, SAVE_AT = 5, 4, 6, 3
HF_METHODS = ["bapat", "lora"]


# --------------------------------------------------------------------------- shared helpers


class RandomImages(torch.utils.data.Dataset):
    """``n`` random 32x32 images with labels from a private generator (the global RNG is untouched)."""

    def __init__(self, n: int = 16, as_dict: bool = True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        self.as_dict = as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.as_dict:
            return {"pixel_values": self.x[i], "labels": self.y[i]}
        return self.x[i], self.y[i]


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_only_delta_moved(model, before: dict[str, torch.Tensor]) -> set[str]:
    """Every frozen base tensor is bit-exact, every delta tensor moved; returns the delta names."""
    delta = set(vpetl.delta_state_dict(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == delta
    after = model.state_dict()
    assert set(after) == set(before)
    frozen_moved = [k for k in before if k not in delta and not torch.equal(before[k], after[k])]
    assert not frozen_moved, f"frozen base tensors changed: {frozen_moved}"
    still = [k for k in delta if torch.equal(before[k], after[k])]
    assert not still, f"delta tensors did not train: {still}"
    return delta


def perturb_zero_init(model):
    """Give zero-initialised branch weights (adapter up, LoRA B) values, so that every trainable
    tensor gets a non-zero gradient and a gradient comparison cannot pass vacuously."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def count_calls(module) -> list[int]:
    """How often ``module`` starts a forward (a pre-hook: non-reentrant checkpointing stops the
    recomputation once it has what backward needs, before forward hooks would run)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --------------------------------------------------------------------------- Hugging Face


def hf_vit(method: str | None = None):
    """Tiny random-weight ``ViTForImageClassification`` (dropout 0 by default), the same weights
    on every call; ``method`` injects it (seeded, so the branches start the same too)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    ))
    if method is not None:
        torch.manual_seed(1)
        vpetl.inject(model, method, d_bottle=R)
    return model


def hf_first_attention(model):
    """Layer 0's attention module: ``vit.layers.0`` in transformers 5, ``vit.encoder.layer.0`` before."""
    for path in ("vit.layers.0.attention", "vit.encoder.layer.0.attention"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
    raise AssertionError("no layer-0 attention found in the HF ViT")


def hf_args(out: Path, **overrides):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers.Trainer requires it
    kwargs = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=SAVE_AT, logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def hf_trainer(model, args, callbacks=()):
    transformers = pytest.importorskip("transformers")
    return transformers.Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=list(callbacks))


def hf_callbacks():
    transformers = pytest.importorskip("transformers")

    class Snapshots(transformers.TrainerCallback):
        """The model's state when training starts (after a resume has loaded) and after each step."""

        def __init__(self):
            self.at_begin, self.after_step, self.steps = None, {}, 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.at_begin = clone_state(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.steps += 1
            self.after_step[state.global_step] = clone_state(model)

    class DeltaCheckpoint(transformers.TrainerCallback):
        """The resume pattern for HF: write the vpetl delta into every checkpoint folder."""

        def on_save(self, args, state, control, model=None, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            vpetl.save_delta(model, folder / "vpetl_delta.safetensors")

    return Snapshots, DeltaCheckpoint


@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_trainer_trains_delta_only_saves_and_round_trips(method, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = hf_vit(method)
    before = clone_state(model)
    trainer = hf_trainer(model, hf_args(tmp_path / "run", save_strategy="no"))
    trainer.train()
    assert trainer.state.global_step == STEPS

    # the optimizer HF builds holds exactly the trainable tensors: the branches and the head
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    delta = check_only_delta_moved(model, before)
    assert {"classifier.weight", "classifier.bias"} <= delta
    assert all(".vpetl_" in n or n.startswith("classifier.") for n in delta)

    # save_model writes a normal HF folder; from_pretrained of the plain class reads the exact
    # base and head back, and HF's key renaming maps every branch key back to its vpetl name
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").is_file()
    plain, info = transformers.ViTForImageClassification.from_pretrained(
        str(tmp_path / "saved"), output_loading_info=True
    )
    assert not info["missing_keys"]
    assert set(info["unexpected_keys"]) == {n for n in delta if ".vpetl_" in n}
    trained = model.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, trained[name]), name

    # the delta alone reproduces the trained model on a fresh copy of the same base
    path = vpetl.save_delta(model, tmp_path / "delta.safetensors")
    fresh = hf_vit()
    vpetl.load_delta(fresh, path)
    x = RandomImages(4).x
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, fresh(pixel_values=x).logits)
    reloaded = vpetl.delta_state_dict(fresh)
    assert set(reloaded) == delta
    assert all(torch.equal(reloaded[n], trained[n]) for n in delta)


def _saved_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under the names ``save_pretrained`` writes them (transformers 5 renames)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x saves the model's own names
        return dict(tensors)
    return revert_weight_conversion(model, dict(tensors))


def _interrupted_and_resumed(method, out: Path):
    """Train STEPS steps with a checkpoint every SAVE_AT, then a second run of the same script
    resumed from checkpoint-SAVE_AT with HF's own resume; both runs' snapshots."""
    Snapshots, _ = hf_callbacks()
    full, resumed = Snapshots(), Snapshots()
    hf_trainer(hf_vit(method), hf_args(out), [full]).train()
    model = hf_vit(method)
    trainer = hf_trainer(model, hf_args(out), [resumed])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_AT}"))
    return full, resumed, model, trainer


def _restored(full, resumed, names) -> set[str]:
    """The tensors whose value when the resumed run starts is the checkpoint's."""
    return {n for n in names if torch.equal(resumed.at_begin[n], full.after_step[SAVE_AT][n])}


@pytest.fixture(scope="module")
def plain_hf_resume(tmp_path_factory):
    """What HF's resume restores for the same ViT without vpetl (everything trains)."""
    full, resumed, model, trainer = _interrupted_and_resumed(None, tmp_path_factory.mktemp("plain"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "trainable": trainable,
        "restored": _restored(full, resumed, trainable),
        "global_step": trainer.state.global_step,
        "steps_after_resume": resumed.steps,
    }


@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_resume_no_worse_than_plain_hf(method, tmp_path, plain_hf_resume):
    full, resumed, model, trainer = _interrupted_and_resumed(method, tmp_path)
    delta = list(vpetl.delta_state_dict(model))

    # the checkpoint HF wrote holds the delta as it was at that step (under HF's saved names)
    import safetensors.torch

    checkpoint = safetensors.torch.load_file(str(tmp_path / f"checkpoint-{SAVE_AT}" / "model.safetensors"))
    at_save = full.after_step[SAVE_AT]
    expected = _saved_names(model, {n: at_save[n] for n in delta})
    assert len(expected) == len(delta)
    for key, value in expected.items():
        assert key in checkpoint, key
        assert torch.equal(checkpoint[key], value), key

    # the resumed run stops where the plain one does, after the same number of steps
    assert trainer.state.global_step == plain_hf_resume["global_step"] == STEPS
    assert resumed.steps == plain_hf_resume["steps_after_resume"] == STEPS - SAVE_AT

    # every tensor HF restores for the plain model is restored for the injected one: the head by
    # its own name; a branch once HF restores the base tensors of the module it is attached to
    plain_trainable, plain_restored = plain_hf_resume["trainable"], plain_hf_resume["restored"]
    must = set()
    for name in delta:
        if name in plain_trainable:
            if name in plain_restored:
                must.add(name)
        else:
            owner = name.split(".vpetl_")[0] + "."
            siblings = [n for n in plain_trainable if n.startswith(owner)]
            assert siblings, name
            if all(n in plain_restored for n in siblings):
                must.add(name)
    assert {"classifier.weight", "classifier.bias"} <= must  # HF restores the plain head
    missing = must - _restored(full, resumed, delta)
    assert not missing, f"HF restores these for the plain model but not for the injected one: {sorted(missing)}"

    # whatever HF's loader did, the frozen base is untouched
    start = full.after_step[SAVE_AT]
    for name, value in model.state_dict().items():
        if name not in delta:
            assert torch.equal(value, start[name]), name


@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_resume_with_delta_in_checkpoint_is_exact(method, tmp_path):
    """Save the delta into each checkpoint (a callback), load it into the fresh model before
    ``train(resume_from_checkpoint=...)``: HF restores optimizer, scheduler, RNG and data
    position, and the resumed run ends bit-identical to the uninterrupted one."""
    Snapshots, DeltaCheckpoint = hf_callbacks()
    out = tmp_path / "run"
    full = Snapshots()
    model = hf_vit(method)
    hf_trainer(model, hf_args(out), [full, DeltaCheckpoint()]).train()
    checkpoint = out / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "vpetl_delta.safetensors").is_file()

    fresh = hf_vit()  # the script starts again from the plain pretrained base
    vpetl.load_delta(fresh, checkpoint / "vpetl_delta.safetensors")
    resumed = Snapshots()
    trainer = hf_trainer(fresh, hf_args(out), [resumed, DeltaCheckpoint()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(checkpoint))

    delta = list(vpetl.delta_state_dict(fresh))
    assert _restored(full, resumed, delta) == set(delta)
    assert trainer.state.global_step == STEPS and resumed.steps == STEPS - SAVE_AT
    end, final = full.after_step[STEPS], fresh.state_dict()
    for name in final:
        assert torch.equal(final[name], end[name]), name


# --------------------------------------------------------------------------- Lightning


def lightning_module(method: str):
    L = pytest.importorskip("lightning")

    class InjectedViT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_vit(num_classes=CLASSES)
            torch.manual_seed(1)
            vpetl.inject(self.model, method, d_bottle=R)
            self.at_train_start = None

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

        def on_train_start(self):
            self.at_train_start = clone_state(self.model)

    return InjectedViT()


def lightning_fit(module, out: Path, ckpt_path=None):
    L = pytest.importorskip("lightning")
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out, filename="{step}", every_n_train_steps=SAVE_AT, save_top_k=-1
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints], default_root_dir=out, num_sanity_val_steps=0,
    )
    # 12 images, batch 4: checkpoint at step 3 closes epoch 0, so resume restarts on a clean epoch
    loader = torch.utils.data.DataLoader(RandomImages(12, as_dict=False), batch_size=4, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|dirpath has changed).*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("method", HF_METHODS)
def test_lightning_fit_resume_and_delta(method, tmp_path):
    module = lightning_module(method)
    before = clone_state(module.model)
    trainer = lightning_fit(module, tmp_path / "run")
    assert trainer.global_step == STEPS
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    delta = check_only_delta_moved(module.model, before)

    # a Lightning checkpoint is the module's state dict: base keys unchanged, delta included
    ckpt_path = tmp_path / "run" / f"step={SAVE_AT}.ckpt"
    assert ckpt_path.is_file()
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == {f"model.{k}" for k in before}

    # resume: strict load into a freshly injected module, optimizer and loop state included;
    # it starts from the checkpoint's delta and ends where the uninterrupted run ended
    resumed = lightning_module(method)
    trainer = lightning_fit(resumed, tmp_path / "resumed", ckpt_path=str(ckpt_path))
    assert trainer.global_step == STEPS
    for name in delta:
        assert torch.equal(resumed.at_train_start[name], saved[f"model.{name}"]), name
        assert not torch.equal(saved[f"model.{name}"], before[name]), name
    final, end = resumed.model.state_dict(), module.model.state_dict()
    for name in final:
        assert torch.equal(final[name], end[name]), name

    # delta round trip onto a fresh base
    path = vpetl.save_delta(module.model, tmp_path / "delta.safetensors")
    fresh = tiny_vit(num_classes=CLASSES)
    vpetl.load_delta(fresh, path)
    x = RandomImages(4).x
    module.model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(module.model(x), fresh(x))


# --------------------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(model, forward):
    torch.manual_seed(2)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    loss = F.cross_entropy(forward(model, x), y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads, frozen_grads
    return loss.detach(), grads


def _check_same(plain, checkpointed):
    (loss0, grads0), (loss1, grads1) = plain, checkpointed
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-8)
    assert set(grads1) == set(grads0)
    for name, g in grads0.items():
        assert g is not None and g.abs().sum() > 0, name
        assert grads1[name] is not None, f"{name}: no gradient with checkpointing"
        torch.testing.assert_close(grads1[name], g, rtol=1e-6, atol=1e-8, msg=name)


TIMM_GC_METHODS = ["bapat", "lora", "patt", "adapter"]


@pytest.mark.parametrize("method", TIMM_GC_METHODS)
def test_timm_grad_checkpointing_same_loss_and_grads(method):
    def build():
        model = tiny_vit(num_classes=CLASSES)
        torch.manual_seed(1)
        vpetl.inject(model, method, d_bottle=R)
        perturb_zero_init(model)
        return model.train()

    plain = _loss_and_grads(build(), lambda m, x: m(x))
    model = build()
    model.set_grad_checkpointing(True)
    calls = count_calls(model.blocks[0].attn)
    checkpointed = _loss_and_grads(model, lambda m, x: m(x))
    assert calls[0] == 2  # attention ran again in backward: checkpointing was really on
    _check_same(plain, checkpointed)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", HF_METHODS)
def test_hf_grad_checkpointing_same_loss_and_grads(method, reentrant):
    def build():
        model = hf_vit(method)
        perturb_zero_init(model)
        return model.train()

    def forward(m, x):
        return m(pixel_values=x).logits

    plain = _loss_and_grads(build(), forward)
    model = build()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        # reentrant checkpointing only differentiates a segment whose input requires grad, and the
        # frozen embeddings' output does not: the usual PEFT switch, as for any frozen base
        model.enable_input_require_grads()
    calls = count_calls(hf_first_attention(model))
    checkpointed = _loss_and_grads(model, forward)
    assert calls[0] == 2
    _check_same(plain, checkpointed)


def test_hf_trainer_gradient_checkpointing_flag(tmp_path):
    """``TrainingArguments(activation_checkpointing=True)`` (``gradient_checkpointing`` before
    transformers 5) trains an injected model to the same delta."""
    import dataclasses

    transformers = pytest.importorskip("transformers")
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    results = []
    for gc in (False, True):
        model = hf_vit("bapat")
        calls = count_calls(hf_first_attention(model))
        hf_trainer(model, hf_args(tmp_path / f"gc{gc}", max_steps=3, save_strategy="no", **{flag: gc})).train()
        assert calls[0] == (6 if gc else 3)  # recomputed in each backward when checkpointing
        results.append(vpetl.delta_state_dict(model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-7, msg=name)
