"""SVDPipeline end to end against diffusers' StableVideoDiffusionPipeline at a tiny random config.

Both pipelines drive the same diffusers UNetSpatioTemporalConditionModel (the UNet's own parity is tested with
it); the VAE is ours converted from the reference's weights, the image encoder ours loaded from OpenCLIP-layout
keys. The schedule: diffusers' EulerDiscreteScheduler as SVD releases it (Karras sigmas, 0.002-700, continuous
v-prediction timesteps) against our Euler over our Karras schedule; the test first checks that the two schedules
agree. What differs is arithmetic only: diffusers steps with float32 sigmas, x + (x - D) / sigma * (sigma_next - sigma),
where sigma_next - sigma at sigma = 700 keeps ~4e-5 absolute precision; ours writes the same step as
D + (x - D) * sigma_next / sigma in float64 ratios. A 2-step run (700 -> 0.002 in one step) shows it as a 5e-4
difference; from 3 steps on the two agree to < 1e-5.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffstudio.components import ARCHS
from diffstudio.convert.clip_vision import vision_to_openclip
from diffstudio.convert.svd_vae import temporal_vae_from_diffusers
from diffstudio.detect.svd_vae import derive_temporal_vae_config
from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.families.svd import SVD
from diffstudio.models.svd_vae import TemporalAutoencoderKL
from diffstudio.sampling import get_sigmas
from diffstudio.sampling.prediction import prediction_for
from diffstudio.video.svd import SVDPipeline

SIZE, FRAMES, STEPS = 32, 3, 3
# stabilityai/stable-video-diffusion-img2vid-xt/scheduler/scheduler_config.json
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
                 num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                 steps_offset=1, timestep_spacing="leading", timestep_type="continuous", trained_betas=None,
                 use_karras_sigmas=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).norm() / b.norm()).item()


def _randomise(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=SIZE // 2, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, layers_per_block=1,
        cross_attention_dim=16, num_attention_heads=(2, 4), num_frames=FRAMES).eval()
    _randomise(unet, 0.05)
    vae = _randomise(AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), layers_per_block=2,
                                                  down_block_types=("DownEncoderBlock2D",) * 2))
    encoder = _randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=32, projection_dim=16, hidden_act="gelu")))
    reference = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet,
                                             scheduler=EulerDiscreteScheduler(**SCHEDULER),
                                             feature_extractor=CLIPImageProcessor())
    reference.set_progress_bar_config(disable=True)

    sd = temporal_vae_from_diffusers(vae.state_dict())
    our_vae = TemporalAutoencoderKL(derive_temporal_vae_config(sd)).eval()
    our_vae.load_state_dict(sd)
    arch = ARCHS["clip_vision"]
    canonical = arch.to_canonical(vision_to_openclip(encoder.state_dict()))  # through the single-file layout
    config = arch.derive_config(canonical, {"hidden_act": "gelu", "num_attention_heads": 2})
    our_encoder = arch.build(config)
    our_encoder.load_state_dict(canonical)
    ours = SVDPipeline(types.SimpleNamespace(unet=unet, vae=our_vae, image_encoder=our_encoder.eval()))
    return reference, ours


@pytest.fixture(scope="module")
def image():
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


ARGS = dict(fps=7, motion_bucket_id=127, noise_aug_strength=0.02)


def _reference(reference, image, output_type, **extra):
    return reference(image, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
                     min_guidance_scale=1.0, max_guidance_scale=2.5, decode_chunk_size=2,
                     generator=torch.Generator().manual_seed(7), output_type=output_type, **ARGS, **extra).frames


def test_schedules_agree():
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    scheduler.set_timesteps(STEPS)
    ours = get_sigmas("karras", prediction_for(SVD), STEPS)
    assert torch.allclose(scheduler.sigmas.double(), ours.double(), rtol=1e-6)
    assert torch.allclose(scheduler.timesteps.double(), prediction_for(SVD).sigma_to_t(ours[:-1]).double(), rtol=1e-5)


def test_latents_match_diffusers_end_to_end(pipes, image):
    reference, ours = pipes
    want = _reference(reference, image, "latent")
    got = ours(image, num_frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS, min_cfg=1.0, max_cfg=2.5, seed=7,
               output_type="latent", **ARGS)
    assert got.shape == want.shape == (1, FRAMES, 4, SIZE // 2, SIZE // 2)
    assert rel_err(got, want) < 1e-4


def test_frames_match_diffusers_with_chunked_decoding(pipes, image):
    reference, ours = pipes
    want = _reference(reference, image, "pt")[0]  # (T, 3, H, W) in [0, 1]
    got = ours(image, num_frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS, min_cfg=1.0, max_cfg=2.5, seed=7,
               output_type="pt", decode_chunk_size=2, **ARGS)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


def test_without_guidance_and_other_conditioning(pipes, image):
    """max_cfg <= 1 runs the conditional branch alone; fps, motion bucket and noise aug reach the UNet."""
    reference, ours = pipes
    args = dict(fps=12, motion_bucket_id=40, noise_aug_strength=0.1)
    want = reference(image, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=4,
                     min_guidance_scale=1.0, max_guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                     output_type="latent", **args).frames
    got = ours(image, num_frames=FRAMES, width=SIZE, height=SIZE, steps=4, min_cfg=1.0, max_cfg=1.0, seed=3,
               output_type="latent", **args)
    assert rel_err(got, want) < 1e-4


def test_outputs_and_errors(pipes, image, tmp_path):
    _, ours = pipes
    frames = ours(image, num_frames=2, width=SIZE, height=SIZE, steps=1, seed=0)
    assert len(frames) == 2 and frames[0].size == (SIZE, SIZE)
    out = ours(image, num_frames=2, width=SIZE, height=SIZE, steps=1, seed=0, output=str(tmp_path / "frames"))
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["00000.png", "00001.png"]
    assert out == str(tmp_path / "frames")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / "00001.png")), np.asarray(frames[1]))
    with pytest.raises(InvalidSizeError):
        ours(image, num_frames=2, width=SIZE + 1, height=SIZE, steps=1)
    with pytest.raises(InvalidInputError):
        ours(None)
    with pytest.raises(InvalidInputError, match="strength"):
        ours(image, num_frames=2, width=SIZE, height=SIZE, steps=1, init_video=[image, image])


def test_video_to_video_keeps_the_input_at_low_strength(pipes, image):
    """strength trims the schedule: 0 returns the input video's latents, and a low strength stays near them."""
    _, ours = pipes
    video = [image, image.transpose(Image.FLIP_LEFT_RIGHT)]
    clean = ours._encode_video([ours_tensor(f) for f in video], 2)
    kept = ours(image, init_video=video, strength=0.0, width=SIZE, height=SIZE, steps=4, output_type="latent")
    assert torch.equal(kept, clean)
    low = ours(image, init_video=video, strength=0.25, width=SIZE, height=SIZE, steps=8, output_type="latent")
    high = ours(image, init_video=video, strength=1.0, width=SIZE, height=SIZE, steps=8, output_type="latent")
    assert rel_err(low, clean) < rel_err(high, clean)


def ours_tensor(picture):
    from diffstudio.io.images import images_to_tensor

    return images_to_tensor(picture)
