"""AutoencoderKL: parity with diffusers, converters, config derivation, full-size layouts, tiling."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

import diffstudio
from diffstudio.convert.vae import vae_from_diffusers, vae_to_diffusers
from diffstudio.detect.vae import (
    VAE_DIFFUSERS_SENTINELS,
    VAE_SENTINELS,
    config_from_diffusers,
    derive_vae_config,
)
from diffstudio.errors import ConversionError, InvalidSizeError, UnknownModelError
from diffstudio.models.vae import AutoencoderKL, Upsample, VAEConfig
from diffstudio.pipeline import tiled_vae

TINY = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VARIANTS = {  # SD 1.x / SDXL style (4 latent channels, quant convs) and SD3 / FLUX style (16, none)
    "sd": dict(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True),
    "flux": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared, oversubscribed CPU a 2-thread OpenMP barrier waits for a
    descheduled thread on every op, which made these tiny models ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_diffusers(variant: str) -> DiffusersAutoencoderKL:
    model = DiffusersAutoencoderKL(**TINY, **VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everywhere, biases and norm affines included
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def ours_from(reference: DiffusersAutoencoderKL) -> AutoencoderKL:
    sd = vae_from_diffusers(reference.state_dict())
    model = AutoencoderKL(derive_vae_config(sd, {"norm_groups": reference.config.norm_num_groups})).eval()
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def tiny_pairs():
    torch.manual_seed(0)
    return {v: (ref := tiny_diffusers(v), ours_from(ref)) for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_diffusers(tiny_pairs, variant):
    reference, ours = tiny_pairs[variant]
    images = torch.rand(2, 3, 32, 40) * 2 - 1
    latents = torch.randn(2, VARIANTS[variant]["latent_channels"], 8, 10)
    with torch.no_grad():
        dist = reference.encode(images).latent_dist
        mean, logvar = ours.encode_dist(images)
        decoded, expected = ours.decode(latents), reference.decode(latents).sample
    assert mean.shape == dist.mean.shape == (2, VARIANTS[variant]["latent_channels"], 8, 10)
    assert rel_err(mean, dist.mean) < 1e-4
    assert rel_err(logvar, dist.logvar) < 1e-4
    assert torch.equal(ours.encode(images), mean)
    assert decoded.shape == expected.shape == (2, 3, 32, 40)
    assert rel_err(decoded, expected) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_and_derived_config(tiny_pairs, variant):
    reference, ours = tiny_pairs[variant]
    theirs = reference.state_dict()
    canonical = vae_from_diffusers(theirs)
    config = derive_vae_config(canonical, {"norm_groups": 8})
    assert config == ours.config == config_from_diffusers(dict(reference.config))
    assert config.use_quant_conv is (variant == "sd")
    assert config.latent_channels == VARIANTS[variant]["latent_channels"]
    back = vae_to_diffusers(canonical, config)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    again = vae_from_diffusers(back)
    assert again.keys() == canonical.keys() and all(torch.equal(again[k], canonical[k]) for k in canonical)
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_legacy_diffusers_attention_names(tiny_pairs):
    reference, ours = tiny_pairs["sd"]
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, tensor in reference.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        # the oldest files stored the projections as 1x1 convs (4-D)
        legacy[key] = tensor[:, :, None, None] if "proj_attn.weight" in key else tensor
    converted = vae_from_diffusers(legacy)
    assert "encoder.mid.attn_1.q.weight" in converted
    assert all(torch.equal(converted[k], v) for k, v in ours.state_dict().items())


def test_conversion_checks_raise(tiny_pairs):
    reference, _ = tiny_pairs["sd"]
    theirs = reference.state_dict()
    with pytest.raises(ConversionError, match="missing"):
        vae_from_diffusers({k: v for k, v in theirs.items() if "up_blocks.1.resnets.2.conv2" not in k})
    with pytest.raises(ConversionError, match="matched no rule"):
        vae_from_diffusers({**theirs, "decoder.extra_layer.weight": torch.zeros(1)})
    canonical = vae_from_diffusers(theirs)
    config = derive_vae_config(canonical, {"norm_groups": 8})
    bad = dict(canonical, **{"decoder.up.0.block.1.conv1.bias": torch.zeros(5)})
    with pytest.raises(ConversionError, match="shape"):
        vae_to_diffusers(bad, config)
    with pytest.raises(ConversionError, match="not a diffusers"):
        vae_from_diffusers(canonical)


def test_derive_errors_and_decoder_only(tiny_pairs):
    _, ours = tiny_pairs["flux"]
    sd = ours.state_dict()
    with pytest.raises(UnknownModelError, match="missing"):
        derive_vae_config({k: v for k, v in sd.items() if not k.startswith("decoder.conv_in")})
    with pytest.raises(UnknownModelError, match="norm_groups"):
        derive_vae_config(sd)  # widths 16/32 with the default 32 groups: ask for the real group count
    decoder_only = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    assert derive_vae_config(decoder_only, {"norm_groups": 8}) == ours.config


def test_encode_rejects_size_not_multiple_of_factor(tiny_pairs):
    _, ours = tiny_pairs["sd"]
    with pytest.raises(InvalidSizeError, match="multiple of 4"):
        ours.encode(torch.zeros(1, 3, 30, 32))


def test_folded_upsample_matches_nearest_then_conv():
    up = Upsample(8)
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        naive = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert rel_err(up(x), naive) < 1e-5
        assert rel_err(up(x.contiguous(memory_format=torch.channels_last)), naive) < 1e-5
        up.conv.weight.mul_(-2.0)  # an in-place edit (as a LoRA patch does) must refresh the cached fold
        assert rel_err(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))) < 1e-5
    with torch.inference_mode():  # inference tensors carry no version counter: fingerprinted instead
        first = up(x)
        up.conv.weight.add_(1.0)
        assert rel_err(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))) < 1e-5
        assert not torch.allclose(first, up(x))
    # gradients reach the 3x3 kernel through the fold
    loss = up(x).square().mean()
    loss.backward()
    assert up.conv.weight.grad is not None and up.conv.weight.grad.abs().sum() > 0


def test_mixed_precision_levels(tiny_pairs):
    _, ours = tiny_pairs["flux"]
    mixed = AutoencoderKL(ours.config).eval()
    mixed.load_state_dict(ours.state_dict())
    mixed.set_precision(torch.bfloat16, levels=1)
    assert mixed.decoder.up[0].block[0].conv1.weight.dtype == torch.bfloat16
    assert mixed.decoder.up[1].block[0].conv1.weight.dtype == torch.float32
    assert mixed.decoder.mid.attn_1.q.weight.dtype == torch.float32
    assert mixed.encoder.down[0].block[0].conv1.weight.dtype == torch.bfloat16
    assert mixed.encoder.conv_out.weight.dtype == torch.float32
    latents, images = torch.randn(1, 16, 8, 8), torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert rel_err(mixed.decode(latents), ours.decode(latents)) < 5e-2
        assert rel_err(mixed.encode(images), ours.encode(images)) < 5e-2
    mixed.set_precision(levels=0)  # back to fp32 everywhere (weights keep their bf16 rounding)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())


# Widths that are not multiples of the first level's (legal in diffusers).
ODD_WIDTHS = dict(block_out_channels=(32, 48, 80), layers_per_block=1, norm_num_groups=16, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def test_any_level_widths_load_from_a_diffusers_folder(tmp_path):
    from tests.tiny_sd15 import randomise, reference_models, write_diffusers_folder

    unet, _, text = reference_models()
    reference = DiffusersAutoencoderKL(**ODD_WIDTHS).eval()
    randomise(reference, 7)
    models = diffstudio.load(write_diffusers_folder(tmp_path / "model", unet, reference, text))
    ours = models.vae
    assert ours.config.block_out_channels == (32, 48, 80) and ours.config.norm_groups == 16
    images, latents = torch.rand(2, 3, 32, 40) * 2 - 1, torch.randn(2, 4, 8, 10)
    with torch.no_grad():
        dist = reference.encode(images).latent_dist
        mean, logvar = ours.encode_dist(images)
        assert rel_err(mean, dist.mean) < 1e-4 and rel_err(logvar, dist.logvar) < 1e-4
        assert rel_err(ours.decode(latents), reference.decode(latents).sample) < 1e-4
    # The single-file (LDM) layout of the same weights derives the same config and converts back exactly.
    theirs = reference.state_dict()
    canonical = vae_from_diffusers(theirs)
    assert derive_vae_config(canonical, {"norm_groups": 16}) == ours.config
    back = vae_to_diffusers(canonical, ours.config)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_config_reads_ldm_ch_and_ch_mult():
    """Configs may give the widths as LDM's ch x ch_mult (the ddconfig vocabulary)."""
    ldm = {"latent_channels": 4, "base_channels": 32, "channel_mult": [1, 2, 2, 2], "norm_groups": 8}
    assert VAEConfig.from_dict(ldm).block_out_channels == (32, 64, 64, 64)


def _meta_pair(variant: str):
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**REAL, **VARIANTS[variant])
    return reference, reference.state_dict()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_size_layout_on_meta(variant):
    reference, theirs = _meta_pair(variant)
    assert all(k in theirs for k in VAE_DIFFUSERS_SENTINELS)
    canonical = vae_from_diffusers(theirs)
    config = derive_vae_config(canonical)
    assert config == config_from_diffusers(dict(reference.config))
    assert config.block_out_channels == (128, 256, 512, 512) and config.num_res_blocks == 2
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    assert all(p.is_meta for p in ours.parameters())
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in canonical.items()} == expected
    assert all(k in expected for k in VAE_SENTINELS)
    # real LDM single-file names
    assert expected["decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert expected["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert expected["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert expected["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert expected["decoder.up.1.upsample.conv.weight"] == (256, 256, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in expected
    assert "decoder.up.0.upsample.conv.weight" not in expected
    latent = VARIANTS[variant]["latent_channels"]
    assert expected["encoder.conv_out.weight"] == (2 * latent, 512, 3, 3)
    assert ("quant_conv.weight" in expected) is (variant == "sd")
    back = vae_to_diffusers(canonical, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


# ---- tiling ----------------------------------------------------------------------------------------


def test_blending_is_exact_for_tile_independent_maps():
    # With a map that does not depend on context, feathered blending must reproduce it exactly.
    x = torch.randn(1, 2, 37, 29)
    upsample = lambda t: t.repeat_interleave(4, -1).repeat_interleave(4, -2) * 3.0  # noqa: E731
    out = tiled_vae._run_tiled(upsample, x, (37, 29), tile=12, overlap=4, in_scale=1, out_scale=4,
                               progress=False, what="test")
    assert torch.allclose(out, upsample(x), atol=1e-5)
    for length, tile, overlap in ((37, 12, 4), (100, 64, 16), (64, 64, 16), (65, 64, 16)):
        starts = tiled_vae.tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def tiling_vae():
    torch.manual_seed(1)
    config = VAEConfig(latent_channels=4, block_out_channels=(8, 16), num_res_blocks=1,
                       norm_groups=4)
    model = AutoencoderKL(config).eval()
    return model


def test_tiled_decode_close_to_untiled(tiling_vae):
    latents = torch.randn(1, 4, 40, 40)
    with torch.no_grad():
        full = tiling_vae.decode(latents)
        tiled = tiled_vae.decode_tiled(tiling_vae, latents, tile=32, overlap=16, progress=False)
        covering = tiled_vae.decode_tiled(tiling_vae, latents, tile=40, overlap=8)
        auto = tiled_vae.decode(tiling_vae, latents)
    assert tiled.shape == full.shape == (1, 3, 80, 80)
    # Measured 0.049: each tile normalises with its own GroupNorm statistics and its mid-block attention
    # sees only the tile. A misplaced or unblended tile gives errors of order 1.
    assert rel_err(tiled, full) < 0.1
    assert torch.equal(covering, full) and torch.equal(auto, full)


def test_tiled_encode_close_to_untiled(tiling_vae):
    images = torch.rand(2, 3, 80, 72) * 2 - 1
    with torch.no_grad():
        full = tiling_vae.encode(images)
        tiled = tiled_vae.encode_tiled(tiling_vae, images, tile=64, overlap=32, progress=False)
        forced = tiled_vae.encode(tiling_vae, images, tiled=True, tile=64, overlap=32, progress=False)
    assert tiled.shape == full.shape == (2, 4, 40, 36)
    assert rel_err(tiled, full) < 0.06  # measured 0.026
    assert torch.equal(forced, tiled)
    with pytest.raises(InvalidSizeError):
        tiled_vae.encode_tiled(tiling_vae, images, tile=33, overlap=8)  # not a multiple of f = 2
    with pytest.raises(InvalidSizeError):
        tiled_vae.decode_tiled(tiling_vae, torch.zeros(1, 4, 8, 8), tile=8, overlap=8)
