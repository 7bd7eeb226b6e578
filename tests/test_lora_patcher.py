"""The patcher's contract: exact removal, strength 0 = the base, LoRAs compose additively, strengths
scale linearly, and the merged and on-the-fly modes give the same outputs (fp32)."""

from __future__ import annotations

import pytest
import torch

from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TO_K2 = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_FC1 = "lora_te_text_model_encoder_layers_1_mlp_fc1"
NORM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1"


def r(*shape, seed=0, scale=0.2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def lora_file(seed: int) -> dict:
    """Plain LoRA, LoCon 3x3, LoHa and a text encoder layer (SD 1.x demo widths: 64, context 64)."""
    return {f"{TO_Q}.lora_down.weight": r(4, 64, seed=seed), f"{TO_Q}.lora_up.weight": r(64, 4, seed=seed + 1),
            f"{TO_Q}.alpha": torch.tensor(2.0),
            f"{CONV1}.lora_down.weight": r(4, 64, 3, 3, seed=seed + 2),
            f"{CONV1}.lora_up.weight": r(64, 4, 1, 1, seed=seed + 3),
            f"{TO_K2}.hada_w1_a": r(64, 2, seed=seed + 4), f"{TO_K2}.hada_w1_b": r(2, 64, seed=seed + 5),
            f"{TO_K2}.hada_w2_a": r(64, 2, seed=seed + 6), f"{TO_K2}.hada_w2_b": r(2, 64, seed=seed + 7),
            f"{TE_FC1}.lora_down.weight": r(2, 64, seed=seed + 8), f"{TE_FC1}.lora_up.weight": r(256, 2, seed=seed + 9)}


@pytest.fixture()
def models():
    return untrained_demo_models()


def run(models):
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 77, 64, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    with torch.no_grad():
        return models.unet(x, t, ctx), models.text_encoder(ids).last_hidden_state


def state(models):
    return {role: {k: v.clone() for k, v in models.components[role].state_dict().items()}
            for role in ("unet", "text_encoder")}


def assert_same_state(a, b):
    for role in a:
        assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), role


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_remove_restores_every_weight_bit_for_bit(models, dtype):
    for module in (models.unet, models.text_encoder):
        module.to(dtype)
    before = state(models)
    first = models.apply_lora(lora_file(0), strength=0.7)
    second = models.apply_lora(lora_file(20), strength=-1.3)
    first.set_strength(2.0)
    assert not torch.equal(state(models)["unet"]["input_blocks.1.0.in_layers.2.weight"],
                           before["unet"]["input_blocks.1.0.in_layers.2.weight"])
    first.remove()
    second.remove()
    assert_same_state(before, state(models))


@pytest.mark.parametrize("mode", ["merged", "on_the_fly"])
def test_strength_zero_is_the_base(models, mode):
    base = run(models)
    handle = models.apply_lora(lora_file(0), mode=mode)
    patched = run(models)
    assert not torch.allclose(patched[0], base[0], atol=1e-4) and not torch.allclose(patched[1], base[1], atol=1e-4)
    handle.set_strength(0.0)
    assert torch.equal(run(models)[0], base[0]) and torch.equal(run(models)[1], base[1])


def test_two_loras_compose_additively_and_strength_is_linear(models):
    param = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    w0 = models.unet.state_dict()[param].clone()
    a = models.apply_lora(lora_file(0))
    da = models.unet.state_dict()[param] - w0
    a.remove()
    b = models.apply_lora(lora_file(20), strength=0.5)
    db = models.unet.state_dict()[param] - w0
    a = models.apply_lora(lora_file(0))
    assert torch.allclose(models.unet.state_dict()[param] - w0, da + db, atol=1e-6)
    b.set_strength(1.0)
    assert torch.allclose(models.unet.state_dict()[param] - w0, da + 2 * db, atol=1e-6)
    a.remove()
    b.remove()
    assert torch.equal(models.unet.state_dict()[param], w0)


def test_separate_text_strength(models):
    base = run(models)
    handle = models.apply_lora(lora_file(0), strength=1.0, text_strength=0.0)
    unet_out, text_out = run(models)
    assert torch.equal(text_out, base[1]) and not torch.allclose(unet_out, base[0], atol=1e-4)
    handle.set_strength(0.0, text_strength=1.0)
    unet_out, text_out = run(models)
    assert torch.equal(unet_out, base[0]) and not torch.allclose(text_out, base[1], atol=1e-4)
    handle.remove()
    with pytest.raises(InvalidInputError):
        handle.set_strength(1.0)


def test_merged_and_on_the_fly_give_the_same_outputs(models):
    before = state(models)
    merged = models.apply_lora(lora_file(0), strength=0.8, text_strength=1.5)
    extra = models.apply_lora(lora_file(40), strength=0.3)
    expected = run(models)
    merged.remove()
    extra.remove()
    live = models.apply_lora(lora_file(0), strength=0.8, text_strength=1.5, mode="on_the_fly")
    assert_same_state(before, state(models))  # the weights are never touched
    mixed = models.apply_lora(lora_file(40), strength=0.3)  # merged on top of on-the-fly
    out = run(models)
    for a, b in zip(out, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    live.set_strength(0.0)
    mixed.remove()
    live.remove()
    assert_same_state(before, state(models))
    assert not any(m._forward_hooks for m in models.unet.modules())


def test_norm_patches_fall_back_to_merging_on_the_fly(models):
    param = "input_blocks.1.1.transformer_blocks.0.norm1.weight"
    w0 = models.unet.state_dict()[param].clone()
    w_norm = r(64, seed=9)
    handle = models.apply_lora({f"{NORM}.w_norm": w_norm}, mode="on_the_fly")
    assert torch.allclose(models.unet.state_dict()[param], w0 + w_norm)
    handle.remove()
    assert torch.equal(models.unet.state_dict()[param], w0)


def test_unknown_mode_is_refused(models):
    with pytest.raises(InvalidInputError):
        models.apply_lora(lora_file(0), mode="fused")
