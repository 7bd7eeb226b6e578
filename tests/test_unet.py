"""LDM UNet: parity with diffusers' UNet2DConditionModel (tiny, random weights), the converter both
ways, config derivation from shapes, the ControlNet hook, and the real layouts on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffstudio.convert.unet import unet_from_diffusers, unet_to_diffusers
from diffstudio.detect.unet import (
    UNET_DIFFUSERS_SENTINELS,
    UNET_SENTINELS,
    config_from_diffusers,
    derive_unet_config,
)
from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.models import unet as unet_module
from diffstudio.models.layers import attention, timestep_embedding
from diffstudio.models.unet import UNetConfig, UNetModel, cpu_bf16_attention
from diffstudio.release_configs import SD15_UNET, SDXL_UNET

TIME_DIM = 8  # SDXL's addition_time_embed_dim at tiny size (256 in the release)
POOLED = 16

TINY = {
    # SD 1.x: conv proj_in, a fixed head count, attention on all but the last level.
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=2, norm_num_groups=8),
    # SDXL: linear proj, no attention at level 0, per-level depths, 16-wide heads, text_time vector.
    "sdxl": dict(block_out_channels=(32, 64, 96), layers_per_block=1, cross_attention_dim=24,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 2, 2),
                 use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_DIM,
                 projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM),
    # SD 1.5 inpainting: 9 input channels (latent, mask, masked-image latent), 2 levels.
    "inpaint": dict(in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    cross_attention_dim=24, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                    norm_num_groups=8),
}
HINTS = {"sd1": {"num_heads": 2, "norm_groups": 8}, "sdxl": {"num_head_channels": 16, "norm_groups": 8},
         "inpaint": {"num_heads": 4, "norm_groups": 8}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are dominated by thread hand-offs; one thread is faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (no zero-initialised output convs hiding a wrong path)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def reference(kind: str) -> UNet2DConditionModel:
    return randomize(UNet2DConditionModel(sample_size=16, **TINY[kind]))


def ours_from(ref: UNet2DConditionModel) -> tuple[UNetModel, dict]:
    sd = unet_from_diffusers(ref.state_dict())
    model = UNetModel(config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


def inputs(kind: str, size=(16, 16)) -> tuple[tuple, dict, dict]:
    """(x, t, context), diffusers kwargs, our kwargs."""
    c = TINY[kind]
    x = torch.randn(2, c.get("in_channels", 4), *size)
    args = (x, torch.tensor([10.5, 700.0]), torch.randn(2, 7, c["cross_attention_dim"]))
    if kind != "sdxl":
        return args, {}, {}
    pooled, time_ids = torch.randn(2, POOLED), torch.tensor([[512.0, 768, 0, 16, 512, 768]] * 2)
    # SDXL's vector: pooled text embedding ++ sinusoidal embedding of each of the 6 size/crop ids.
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(2, -1)], dim=-1)
    return args, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}, {"y": y}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "inpaint"])
def test_parity_with_diffusers(kind):
    ref = reference(kind)
    ours, _ = ours_from(ref)
    args, ref_kw, our_kw = inputs(kind)
    with torch.no_grad():
        expected = ref(*args, **ref_kw).sample
        got = ours(*args, **our_kw)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4
    ours.to(memory_format=torch.channels_last)  # the opt-in layout: activations follow the weights
    with torch.no_grad():
        assert rel_err(ours(*args, **our_kw), expected) < 1e-4


def test_odd_latent_size_matches_diffusers():
    """9x11 latents: the upsamplers must follow the skips' sizes (5 -> 9, 3 -> 5 ...)."""
    ref = reference("sd1")
    ours, _ = ours_from(ref)
    args, _, _ = inputs("sd1", size=(9, 11))
    with torch.no_grad():
        assert rel_err(ours(*args), ref(*args).sample) < 1e-4


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "inpaint"])
def test_round_trip_and_derived_config(kind):
    ref = reference(kind)
    diffusers_sd = ref.state_dict()
    config = config_from_diffusers(dict(ref.config))
    canonical = unet_from_diffusers(diffusers_sd)
    assert derive_unet_config(canonical, HINTS[kind]) == config
    back = unet_to_diffusers(canonical, config)
    assert set(back) == set(diffusers_sd)
    assert all(torch.equal(back[k], diffusers_sd[k]) for k in back)
    again = unet_from_diffusers(back)
    assert set(again) == set(canonical) and all(torch.equal(again[k], canonical[k]) for k in again)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_controlnet_residuals_match_diffusers():
    ref = reference("sd1")
    ours, _ = ours_from(ref)
    args, _, _ = inputs("sd1")
    with torch.no_grad():
        skips = []
        h = ours.input_blocks[0](args[0], None, None)
        skips.append(h)
        shapes = [h.shape]
        # One residual per input block (shaped like its output), then the middle's.
        emb = ours.time_embed(timestep_embedding(args[1], ours.config.model_channels))
        for block in ours.input_blocks[1:]:
            h = block(h, emb, args[2])
            shapes.append(h.shape)
        control = [0.5 * torch.randn(s) for s in shapes] + [0.5 * torch.randn(h.shape)]
        zeros = [torch.zeros_like(c) for c in control]
        plain = ours(*args)
        assert torch.equal(ours(*args, control=zeros), plain)
        got = ours(*args, control=control)
        expected = ref(*args, down_block_additional_residuals=tuple(control[:-1]),
                       mid_block_additional_residual=control[-1]).sample
    assert rel_err(got, plain) > 1e-2
    assert rel_err(got, expected) < 1e-4
    with pytest.raises(ValueError, match="residuals"):
        ours(*args, control=control[:-1])


def test_training_backward_and_checkpointing_agree():
    ref = reference("sdxl")
    ours, _ = ours_from(ref)
    ours.train()
    args, _, kw = inputs("sdxl", size=(8, 8))
    grads = []
    for checkpointing in (False, True):
        ours.gradient_checkpointing = checkpointing
        ours.zero_grad()
        ours(*args, **kw).square().mean().backward()
        grads.append(ours.input_blocks[3][1].transformer_blocks[0].attn2.to_k.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # LoRA-style: a frozen base with a few trainable weights deep inside a transformer.
    ours.requires_grad_(False)
    ours.zero_grad(set_to_none=True)
    target = ours.input_blocks[3][1].transformer_blocks[0].attn2.to_k.weight
    target.requires_grad_(True)
    ours(*args, **kw).square().mean().backward()
    torch.testing.assert_close(target.grad, grads[0], rtol=1e-4, atol=1e-6)


def test_bf16_inference_error_like_diffusers():
    """bf16 on CPU takes our matmul attention; its error to fp32 stays at diffusers' bf16 level."""
    ref = reference("sd1")
    ours, _ = ours_from(ref)
    args, _, _ = inputs("sd1")
    with torch.inference_mode():
        exact = ref(*args).sample
        ref.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        low = (args[0].bfloat16(), args[1], args[2].bfloat16())
        ours_err, ref_err = rel_err(ours(*low).float(), exact), rel_err(ref(*low).sample.float(), exact)
    assert ours_err < 1.5 * ref_err + 1e-3


def test_cpu_bf16_attention_chunks_agree_with_sdpa(monkeypatch):
    monkeypatch.setattr(unet_module, "CPU_BF16_SCORE_CHUNK", 1000)  # many query chunks, a ragged last one
    q, k, v = (1.5 * torch.randn(2, n, 4 * 16) for n in (300, 77, 77))
    exact = attention(q, k, v, 4)
    assert rel_err(cpu_bf16_attention(q, k, v, 4), exact) < 1e-5  # fp32 through the same code path
    got = cpu_bf16_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), exact) < 3e-2


def test_derive_without_hints_uses_release_conventions():
    conv = derive_unet_config(unet_from_diffusers(reference("sd1").state_dict()))
    assert (conv.num_heads, conv.num_head_channels, conv.norm_groups) == (8, -1, 32)
    with torch.device("meta"):
        linear = UNet2DConditionModel(**TINY["sdxl"])
    derived = derive_unet_config(unet_from_diffusers(linear.state_dict()))
    assert (derived.num_heads, derived.num_head_channels) == (-1, 64)


def test_conversion_errors_name_the_keys():
    diffusers_sd = dict(reference("inpaint").state_dict())
    with pytest.raises(ConversionError, match="matched no rule: lora_unet_extra.weight"):
        unet_from_diffusers({**diffusers_sd, "lora_unet_extra.weight": torch.ones(1)})
    with pytest.raises(ConversionError, match="does not have: input_blocks.1.0.extra.weight"):
        unet_from_diffusers({**diffusers_sd, "down_blocks.0.resnets.0.extra.weight": torch.ones(1)})
    broken = {k: v for k, v in diffusers_sd.items() if k != "up_blocks.1.resnets.0.conv1.weight"}
    with pytest.raises(ConversionError, match="missing: output_blocks.2.0.in_layers.2.weight"):
        unet_from_diffusers(broken)
    canonical = unet_from_diffusers(diffusers_sd)
    config = derive_unet_config(canonical, HINTS["inpaint"])
    wrong = {**canonical, "out.2.weight": torch.ones(3, 32, 3, 3)}
    with pytest.raises(ConversionError, match="shape mismatch"):
        unet_to_diffusers(wrong, config)
    with pytest.raises(UnknownModelError, match="model.diffusion_model"):
        derive_unet_config({"conv_in.weight": torch.ones(1)})
    with pytest.raises(ConversionError, match="class_embed_type"):
        config_from_diffusers({**TINY["sd1"], "class_embed_type": "timestep"})


# ---- real sizes, on the meta device -------------------------------------------------------------

SD15_INPAINT = {**SD15_UNET, "in_channels": 9}
SD21 = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}
REAL = {
    "sd15": (SD15_UNET, {"num_heads": 8}, {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "out.2.weight": (4, 320, 3, 3)}),
    "sd15_inpaint": (SD15_INPAINT, {"num_heads": 8}, {"input_blocks.0.0.weight": (320, 9, 3, 3)}),
    "sd21": (SD21, {"num_head_channels": 64}, {
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}),
    "sdxl": (SDXL_UNET, {"num_head_channels": 64}, {
        "label_emb.0.0.weight": (1280, 2816),
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1)}),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_layout_on_meta(name):
    diffusers_config, hints, known = REAL[name]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_config)
    diffusers_sd = ref.state_dict()
    assert all(k in diffusers_sd for k in UNET_DIFFUSERS_SENTINELS)
    canonical = unet_from_diffusers(diffusers_sd)  # checks every key maps, shapes equal to our model
    config = config_from_diffusers(dict(ref.config))
    assert derive_unet_config(canonical, hints) == config
    with torch.device("meta"):
        ours = UNetModel(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in canonical.items()}
    assert all(k in ours_shapes for k in UNET_SENTINELS)
    for key, shape in known.items():
        assert ours_shapes[key] == shape, key
    # Heads as the release has them: SD 1.5 8 heads of 40..160; SD 2.x/SDXL 64-wide heads.
    attn = ours.input_blocks[1 if name != "sdxl" else 4][1].transformer_blocks[0].attn1
    assert attn.heads == (8 if name.startswith("sd15") else attn.to_q.out_features // 64)
