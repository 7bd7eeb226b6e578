"""SVD spatio-temporal UNet: parity with diffusers' UNetSpatioTemporalConditionModel (tiny, random weights), the
converter both ways, config derivation from shapes, the image-only bypass, and the released SVD / SVD-XT layouts on
the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

from diffstudio.components import ARCHS
from diffstudio.convert.svd_unet import svd_unet_from_diffusers, svd_unet_to_diffusers
from diffstudio.detect import detect, find_component
from diffstudio.detect.svd_unet import config_from_diffusers, derive_svd_unet_config
from diffstudio.errors import InvalidInputError, UnknownModelError
from diffstudio.models.svd_unet import SVDUNet, SVDUNetConfig
from diffstudio.release_configs import SVD_UNET, SVD_XT_UNET

# Two levels (attention on the first only, like SVD's last level), 16-wide heads, 3 added ids of width 8.
# diffusers fixes 32 GroupNorm groups in the temporal layers, so widths are multiples of 32.
TINY = dict(block_out_channels=(32, 64), layers_per_block=(1, 2), cross_attention_dim=24,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            num_frames=5)
TINY_HINTS = {"num_head_channels": 16, "num_frames": 5}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (no zero-initialised output convs hiding a wrong path)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def reference(config: dict | None = None) -> UNetSpatioTemporalConditionModel:
    ref = randomize(UNetSpatioTemporalConditionModel(**(config or TINY)))
    # The release (generative-models' GroupNorm32) normalises every ResBlock with eps 1e-5; diffusers builds the
    # CrossAttnDownBlockSpatioTemporal ResBlocks with 1e-6. We follow the release; the reference is aligned so
    # that the comparison measures the architecture (unaligned, the tiny model differs by ~1e-5 relative).
    for module in ref.modules():
        if isinstance(module, (ResnetBlock2D, TemporalResnetBlock)):
            module.norm1.eps = module.norm2.eps = 1e-5
    return ref


def ours_from(ref: UNetSpatioTemporalConditionModel) -> tuple[SVDUNet, dict]:
    sd = svd_unet_from_diffusers(ref.state_dict())
    model = SVDUNet(config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


def inputs(batch: int = 2, frames: int = 5, height: int = 12, width: int = 10):
    return (torch.randn(batch, frames, 8, height, width), torch.randn(batch, 1, 24),
            torch.tensor([[6.0, 127.0, 0.02], [29.0, 60.0, 0.5]])[:batch])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("timestep", [torch.tensor([0.3, -0.8]), 0.55], ids=["per-video", "scalar"])
def test_parity_with_diffusers(timestep):
    """Odd latent sizes (12x10 -> 6x5) exercise the upsampler's size handling."""
    ref = reference()
    ours, _ = ours_from(ref)
    x, context, ids = inputs()
    with torch.no_grad():
        expected = ref(x, timestep, context, ids).sample
        got = ours(x, timestep, context, ids)
    assert got.shape == (2, 5, 4, 12, 10)
    assert rel_err(got, expected) < 1e-4


def test_converter_round_trip_and_shape_derived_config():
    ref = reference()
    theirs = ref.state_dict()
    ours = svd_unet_from_diffusers(theirs)
    config = config_from_diffusers(dict(ref.config))
    assert derive_svd_unet_config(ours, TINY_HINTS) == config
    back = svd_unet_to_diffusers(ours, config)
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in back)
    # Release names, as svd_xt.safetensors spells them.
    assert "input_blocks.1.0.time_stack.in_layers.2.weight" in ours
    assert "input_blocks.1.0.time_mixer.mix_factor" in ours
    assert "input_blocks.1.1.time_pos_embed.0.weight" in ours
    assert "input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight" in ours
    assert "label_emb.0.2.weight" in ours


def test_image_only_frames_are_independent():
    """image_only_indicator = 1 forces alpha to 1: the temporal layers drop out and frames no longer mix."""
    ours, _ = ours_from(reference())
    x, context, ids = inputs(batch=1, frames=3)
    ids = ids[:1]
    moved = x.clone()
    moved[:, 2] += 1.0
    with torch.no_grad():
        for image_only, frame0_changes in ((torch.ones(1, 3), False), (None, True)):
            a = ours(x, 0.1, context, ids, image_only_indicator=image_only)[:, 0]
            b = ours(moved, 0.1, context, ids, image_only_indicator=image_only)[:, 0]
            assert (not torch.allclose(a, b, atol=1e-6)) == frame0_changes


def test_position_ids_default_to_frame_indices():
    ours, _ = ours_from(reference())
    x, context, ids = inputs(frames=4)
    with torch.no_grad():
        default = ours(x, 0.2, context, ids)
        explicit = ours(x, 0.2, context, ids, position_ids=torch.arange(4))
        shifted = ours(x, 0.2, context, ids, position_ids=torch.arange(4) + 3)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, shifted)


def test_bad_inputs_raise_named_errors():
    ours, _ = ours_from(reference())
    x, context, ids = inputs()
    with pytest.raises(InvalidInputError, match="sample"):
        ours(x[:, 0], 0.1, context, ids)
    with pytest.raises(InvalidInputError, match="added_time_ids"):
        ours(x, 0.1, context, ids[:, :2])
    with pytest.raises(InvalidInputError, match="encoder_hidden_states"):
        ours(x, 0.1, context[..., :8], ids)
    with pytest.raises(InvalidInputError, match="position_ids"):
        ours(x, 0.1, context, ids, position_ids=torch.arange(3))


# ------------------------------------------------------------------------------------------------
# Full size on the meta device
# ------------------------------------------------------------------------------------------------


def _release_state_dict(config: dict) -> dict:
    """The release layout of a real-size SVD UNet: diffusers' module on the meta device, converted."""
    with torch.device("meta"):
        ref = UNetSpatioTemporalConditionModel(**config)
    return svd_unet_from_diffusers(ref.state_dict())


@pytest.mark.parametrize("name, config, frames", [("svd", SVD_UNET, 14), ("svd_xt", SVD_XT_UNET, 25)])
def test_full_size_layout_maps_and_is_detected(name, config, frames):
    sd = _release_state_dict(config)
    ours_config = config_from_diffusers(config)
    assert ours_config.num_frames == frames
    with torch.device("meta"):
        ours = SVDUNet(ours_config).state_dict()
    assert set(sd) == set(ours)
    assert all(sd[k].shape == ours[k].shape for k in ours)
    # The released facts, spelled out once.
    assert sd["input_blocks.1.0.time_stack.in_layers.2.weight"].shape == (320, 320, 3, 1, 1)
    assert sd["middle_block.1.time_pos_embed.0.weight"].shape == (1280 * 4, 1280)
    assert sd["label_emb.0.0.weight"].shape == (1280, 768)
    assert sd["output_blocks.11.1.time_stack.0.attn2.to_k.weight"].shape == (320, 1024)
    assert sum(v.numel() for v in sd.values()) == pytest.approx(1.52e9, rel=0.01)

    # Inside a single file, detection by structure finds it under model.diffusion_model. and derives the
    # config from shapes; the frame count is not in the weights (25 unless a hint or stored config says).
    single_file = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    prefix, layout, found = find_component(single_file, ARCHS["svd_unet"], ("model.diffusion_model.",))
    assert (prefix, layout) == ("model.diffusion_model.", "original")
    derived = ARCHS["svd_unet"].derive_config(found, {"num_frames": frames})
    assert derived == ours_config == SVDUNetConfig(num_frames=frames)
    assert ARCHS["svd_unet"].derive_config(found, {}).num_frames == 25

    # No image family claims an SVD UNet (their UNet checks reject 8 input channels and the temporal layers).
    try:
        detection = detect(single_file)
    except UnknownModelError:
        return
    assert all(c.arch == "svd_unet" for c in detection.components.values() if c.prefix == prefix)


def test_diffusers_layout_is_recognised():
    with torch.device("meta"):
        theirs = UNetSpatioTemporalConditionModel(**TINY).state_dict()
    arch = ARCHS["svd_unet"]
    assert arch.is_diffusers(theirs) and not arch.is_canonical(theirs)
    assert arch.is_canonical(arch.to_canonical(theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_keep_the_input_layout(dtype):
    """Contiguous in, contiguous out of every video block: a channels_last activation (the transformer's output is
    permuted from (B*T, H*W, C)) would slow every later GroupNorm on the CPU many times over."""
    from diffstudio.models.svd_blocks import SpatialVideoTransformer, VideoResBlock

    ours, _ = ours_from(reference())
    ours.to(dtype)
    layouts = []
    for module in ours.modules():
        if isinstance(module, (VideoResBlock, SpatialVideoTransformer)):
            module.register_forward_hook(lambda m, args, out: layouts.append((type(m).__name__, out.is_contiguous())))
    x, context, ids = inputs()
    with torch.inference_mode():
        ours(x.to(dtype), 0.3, context.to(dtype), ids)
    assert len(layouts) > 4 and all(contiguous for _, contiguous in layouts), layouts
