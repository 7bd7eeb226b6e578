"""The SVD temporal VAE: parity with diffusers' AutoencoderKLTemporalDecoder, converters both ways, detection,
the release's key names at full size (meta device), and chunked decoding."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder

from diffstudio.components import ARCHS
from diffstudio.convert.svd_vae import temporal_vae_from_diffusers, temporal_vae_to_diffusers
from diffstudio.detect.svd_vae import config_from_diffusers, derive_temporal_vae_config
from diffstudio.errors import ConversionError, InvalidInputError, UnknownModelError
from diffstudio.models.svd_vae import TemporalAutoencoderKL

# diffusers' temporal decoder fixes 32 GroupNorm groups, so the tiny widths are multiples of 32.
TINY = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2)
# The released SVD / SVD-XT VAE (stabilityai/stable-video-diffusion-img2vid*/vae/config.json).
REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = AutoencoderKLTemporalDecoder(**TINY).eval()
    with torch.no_grad():
        for p in reference.parameters():  # random everywhere: mix factors, temporal convs, norms
            p.copy_(torch.randn_like(p) * 0.2)
    sd = temporal_vae_from_diffusers(reference.state_dict())
    ours = TemporalAutoencoderKL(derive_temporal_vae_config(sd)).eval()
    ours.load_state_dict(sd)
    return reference, ours


def test_decode_matches_diffusers_clip_by_clip(pair):
    reference, ours = pair
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat([reference.decode(z[i:i + 3], num_frames=3).sample for i in (0, 3)])
        got = ours.decode(z, num_frames=3)
        whole = ours.decode(z)  # one clip of 6: the temporal layers see across the boundary
    assert got.shape == (6, 3, 16, 16)
    assert rel_err(got, want) < 1e-4
    assert rel_err(whole, want) > 1e-3  # the frames do interact: a wrong clip split would show


def test_decode_chunks_is_the_reference_chunked_decode(pair):
    reference, ours = pair
    z = torch.randn(7, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.cat([reference.decode(z[i:i + 3], num_frames=len(z[i:i + 3])).sample for i in range(0, 7, 3)])
        got = torch.cat(list(ours.decode_chunks(z, 3)))
    assert rel_err(got, want) < 1e-4
    with pytest.raises(InvalidInputError):
        next(ours.decode_chunks(z, 0))


def test_encode_matches_diffusers(pair):
    reference, ours = pair
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        dist = reference.encode(images).latent_dist
        mean, logvar = ours.encode_dist(images)
    assert rel_err(mean, dist.mean) < 1e-4
    assert rel_err(logvar, dist.logvar) < 1e-4


def test_converter_round_trip_and_detection(pair):
    reference, ours = pair
    theirs = reference.state_dict()
    back = temporal_vae_to_diffusers(ours.state_dict(), ours.config)
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert ours.config == config_from_diffusers(dict(reference.config))
    arch = ARCHS["svd_vae"]
    assert arch.is_canonical(ours.state_dict()) and arch.is_diffusers(theirs)
    assert not arch.is_canonical(theirs)
    assert not ARCHS["ldm_vae"].is_diffusers(theirs)  # diffusers' image-VAE layout is not this one


def test_converter_refuses_what_it_cannot_place(pair):
    reference, _ = pair
    sd = dict(reference.state_dict())
    sd["decoder.up_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="matched no rule"):
        temporal_vae_from_diffusers(sd)
    del sd["decoder.up_blocks.0.resnets.0.extra.weight"]
    del sd["decoder.up_blocks.1.resnets.2.temporal_res_block.conv2.weight"]
    with pytest.raises(ConversionError, match="missing"):
        temporal_vae_from_diffusers(sd)
    with pytest.raises(UnknownModelError):
        derive_temporal_vae_config({"decoder.conv_in.weight": torch.zeros(1)})


def test_release_layout_at_full_size():
    """The released VAE's diffusers layout maps onto ours key for key, with the release's names."""
    with torch.device("meta"):
        reference = AutoencoderKLTemporalDecoder(**REAL)
    sd = temporal_vae_from_diffusers(reference.state_dict())
    config = derive_temporal_vae_config(sd)
    assert config.block_out_channels == (128, 256, 512, 512) and config.num_res_blocks == 2
    assert config.time_kernel == 3 and config.use_quant_conv
    with torch.device("meta"):
        ours = TemporalAutoencoderKL(config)
    expected = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    # Names of svd.safetensors' first_stage_model (generative-models, sgm/modules/autoencoding/temporal_ae.py).
    for key, shape in {"decoder.conv_out.time_mix_conv.weight": (3, 3, 3, 1, 1),
                       "decoder.mid.block_1.mix_factor": (1,),
                       "decoder.up.3.block.0.time_stack.in_layers.2.weight": (512, 512, 3, 1, 1),
                       "decoder.up.0.block.2.time_stack.out_layers.3.weight": (128, 128, 3, 1, 1),
                       "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
                       "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}.items():
        assert tuple(expected[key].shape) == shape, key
    # The release's first_stage_model has no quant_conv: its config says so.
    no_quant = {k: v for k, v in expected.items() if not k.startswith("quant_conv")}
    assert not derive_temporal_vae_config(no_quant).use_quant_conv
