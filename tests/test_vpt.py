"""VPT: prompt tokens after the prefix tokens, shallow and deep, on timm / torchvision / HF ViTs.

Every output is compared with a hand-written reference that concatenates the tokens itself
and runs the untouched base model's blocks one by one.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.models.video.swin_transformer import SwinTransformer3d

import vpetl
from vpetl.methods.vpt import PromptTokens, prefix_token_count
from vpetl.record import get_record

from conftest import tiny_vit, trainable_count

L = 4


# ----------------------------------------------------------------------------- models


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits its head: logits would all be 0
    return model


def hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config)


def timm_avg_registers() -> nn.Module:
    """No class token, 2 register tokens, mean pooling: prefix = 2, pooled over patch tokens."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2, class_token=False, reg_tokens=2, global_pool="avg")


# name -> (builder, block list path, head keys, prefix tokens)
FAMILIES = {
    "timm": (tiny_vit, "blocks", {"head.weight", "head.bias"}, 1),
    "timm-avg-reg": (timm_avg_registers, "blocks", {"head.weight", "head.bias"}, 2),
    "torchvision": (tv_vit, "encoder.layers", {"heads.head.weight", "heads.head.bias"}, 1),
    "hf": (hf_vit, "vit.layers", {"classifier.weight", "classifier.bias"}, 1),
}


def run(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits if family == "hf" else model(x)


def blocks_of(family: str, model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(FAMILIES[family][1]).children())


def embed(family: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The token sequence entering the first block, written out per family."""
    if family.startswith("timm"):
        return base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
    if family == "torchvision":
        t = base._process_input(x)
        t = torch.cat([base.class_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + base.encoder.pos_embedding
    return base.vit.embeddings(x)


def finish(family: str, base: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if family.startswith("timm"):
        return base.forward_head(base.norm(t))
    if family == "torchvision":
        return base.heads(base.encoder.ln(t)[:, 0])
    return base.classifier(base.vit.layernorm(t)[:, 0])


def reference(family: str, base: nn.Module, prompts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """VPT by hand: [c, P_0, z] into block 0; block l < len(prompts) gets its prompt positions
    replaced by P_l; the prompt positions are cut after the last block."""
    p = FAMILIES[family][3]
    t = embed(family, base, x)
    for index, block in enumerate(blocks_of(family, base)):
        if index < len(prompts):
            rest = t[:, p:] if index == 0 else t[:, p + L :]
            t = torch.cat([t[:, :p], prompts[index].expand(t.shape[0], -1, -1), rest], dim=1)
        t = block(t)
        t = t[0] if isinstance(t, tuple) else t
    return finish(family, base, torch.cat([t[:, :p], t[:, p + L :]], dim=1))


def injected(family: str, deep: bool) -> tuple[nn.Module, nn.Module]:
    base = FAMILIES[family][0]().eval()
    model = vpetl.inject(copy.deepcopy(base), "vpt", length=L, deep=deep)
    return base, model


def prompt_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [m.tokens for m in model.modules() if isinstance(m, PromptTokens)]


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


CASES = [(f, d) for f in FAMILIES for d in (False, True)]
IDS = [f"{f}-{'deep' if d else 'shallow'}" for f, d in CASES]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family,deep", CASES, ids=IDS)
def test_exact_trainable_keys(family, deep):
    _, model = injected(family, deep)
    blocks_path, head = FAMILIES[family][1], FAMILIES[family][2]
    names = [n for n, _ in model.get_submodule(blocks_path).named_children()]
    prompted = names if deep else names[:1]
    expected = {f"{blocks_path}.{n}.vpetl_prompt.tokens" for n in prompted} | head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(get_record(model).delta_names) == expected
    assert all(t.shape == (L, 32) for t in prompt_tensors(model))


@pytest.mark.parametrize("family,deep", CASES, ids=IDS)
def test_matches_manual_concatenation_and_differs_from_base(family, deep, x):
    base, model = injected(family, deep)
    with torch.no_grad():
        out = run(family, model, x)
        expected = reference(family, base, prompt_tensors(model), x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, run(family, base, x), atol=1e-4)


@pytest.mark.parametrize("family,deep", CASES, ids=IDS)
def test_every_block_sees_n_plus_l_tokens_and_the_head_sees_n(family, deep, x):
    base, model = injected(family, deep)
    n = embed(family, base, x).shape[1]
    seen: list[int] = []
    blocks = blocks_of(family, model)
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in blocks]
    after = []
    last = blocks[-1]
    hooks.append(last.register_forward_hook(lambda m, args, out: after.append(out.shape[1])))  # runs after the cut
    with torch.no_grad():
        run(family, model, x)
    for h in hooks:
        h.remove()
    assert seen == [n + L] * len(blocks)
    assert after == [n]


@pytest.mark.parametrize("family", ["timm", "torchvision", "hf"])
def test_gradients_reach_every_prompt_and_no_frozen_parameter(family, x):
    _, model = injected(family, deep=True)
    run(family, model.train(), x).square().mean().backward()
    for name, param in model.named_parameters():
        if "vpetl_prompt" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif not param.requires_grad:
            assert param.grad is None, name


@pytest.mark.parametrize("family,deep", CASES, ids=IDS)
def test_unload_restores_the_base_exactly(family, deep, x):
    base, model = injected(family, deep)
    vpetl.unload(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(run(family, model, x), run(family, base, x))


@pytest.mark.parametrize("family,deep", CASES, ids=IDS)
def test_disabled_runs_the_base_and_reattaches(family, deep, x):
    base, model = injected(family, deep)
    with torch.no_grad():
        out = run(family, model, x)
        with vpetl.disabled(model):
            assert torch.equal(run(family, model, x), run(family, base, x))
        assert torch.equal(run(family, model, x), out)


@pytest.mark.parametrize("family,deep", [("timm", True), ("torchvision", False), ("hf", True)])
def test_save_load_delta_round_trip_on_a_fresh_model(family, deep, x, tmp_path):
    _, model = injected(family, deep)
    with torch.no_grad():
        for t in prompt_tensors(model):
            t.normal_()
    path = vpetl.save_delta(model, tmp_path / "vpt.safetensors")
    fresh = vpetl.load_delta(FAMILIES[family][0]().eval(), path)
    with torch.no_grad():
        assert torch.equal(run(family, fresh, x), run(family, model, x))


def test_deepcopy_is_independent_and_first_forward_check_passes(x):
    _, model = injected("timm", deep=True)
    vpetl.verify(model, x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        clone.blocks[1].vpetl_prompt.tokens.add_(1.0)
        assert not torch.equal(clone(x), model(x))
    vpetl.unload(clone)  # removes the clone's hooks, not the original's
    assert model.blocks[0]._forward_pre_hooks and not clone.blocks[0]._forward_pre_hooks


def test_prefix_token_counts_and_vpt_init():
    assert prefix_token_count(tiny_vit()) == 1
    assert prefix_token_count(timm_avg_registers()) == 2
    assert prefix_token_count(tv_vit()) == 1
    model = vpetl.inject(tiny_vit(), "vpt", length=L)
    tokens = model.blocks[0].vpetl_prompt.tokens
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))  # VPT: xavier-uniform with fan_in = C * patch area
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.5 * bound


def test_window_attention_refuses_and_leaves_the_model_untouched():
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                              window_size=[2, 4, 4], num_classes=5)
    keys = list(model.state_dict())
    with pytest.raises(vpetl.InjectionError, match=r"window attention \(ShiftedWindowAttention3d\).*"
                       r"\(B, T, H, W, C\).*token sequence.*'prefix'.*'bapat'"):
        vpetl.inject(model, "vpt", length=L)
    assert get_record(model) is None and list(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_sequence_first_transformer_encoder_refuses():
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=False)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with pytest.raises(vpetl.InjectionError, match=r"batch_first=False.*\(N, B, C\).*'prefix'"):
        vpetl.inject(model, "vpt")


def test_a_mask_passed_to_the_blocks_is_refused_at_forward(x):
    model = vpetl.inject(tiny_vit(), "vpt", length=L)
    n = 17
    with pytest.raises(vpetl.InjectionError, match=r"blocks\.0 \(Block\) also received a tensor.*cannot extend"):
        model.forward_features(x, attn_mask=torch.zeros(n, n))


def test_vpt_defaults_match_its_paper_on_vit_b():
    """VPT-Shallow on ViT-B/16: prompts uniform in +-sqrt(6 / (3 * 16^2 + 768)) = +-0.0625, inserted
    right after the CLS token, no dropout by default, 768 * L parameters (9,216 * L deep)."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    torch.manual_seed(0)
    vpetl.inject(model, "vpt", length=50)
    tokens = model.blocks[0].vpetl_prompt.tokens
    assert tokens.shape == (50, 768) and vpetl.VPT().dropout == 0.0
    assert 0.0625 * 0.95 < tokens.abs().max().item() <= 0.0625
    assert trainable_count(model) == 768 * 50
    deep = vpetl.inject(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), "vpt",
                        length=2, deep=True)
    assert sum(p.numel() for p in deep.parameters() if p.requires_grad) == 9_216 * 2


def test_prompt_dropout_acts_in_training_only(x):
    model = vpetl.inject(tiny_vit(), vpetl.VPT(length=4, dropout=0.5))
    prompt = model.blocks[0].vpetl_prompt
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 1:5].clone()))
    model.train()(x)
    model.eval()(x)
    train_prompts, eval_prompts = seen[-2], seen[-1]
    torch.testing.assert_close(eval_prompts, prompt.tokens.expand_as(eval_prompts).detach())
    zeroed = (train_prompts == 0).float().mean().item()
    assert 0.3 < zeroed < 0.7  # about half dropped, the rest scaled by 2
    kept = train_prompts != 0
    torch.testing.assert_close(train_prompts[kept], (2 * prompt.tokens.expand_as(train_prompts))[kept].detach())
    with pytest.raises(vpetl.ConfigError, match=r"prompt dropout must be in \[0, 1\)"):
        vpetl.VPT(dropout=1.5)
