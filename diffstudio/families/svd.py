"""Stable Video Diffusion (Blattmann et al. 2023, "Stable Video Diffusion: Scaling Latent Video Diffusion
Models to Large Datasets"): image-to-video. A spatio-temporal UNet (``svd_unet``) denoises the latents of every
frame, conditioned on the CLIP ViT-H/14 image embedding of the first frame (cross-attention, one token), on that
frame's VAE latent concatenated to every frame's input (8 channels in), and on three "added time ids" (fps - 1,
motion bucket, noise-augmentation strength). v-prediction with EDM preconditioning over continuous sigmas
(``sampling.prediction.EDMV``), Karras schedule between 0.002 and 700; the temporal VAE decodes.

svd.safetensors and svd_xt.safetensors (1.0 / 1.1) have one structure; they differ in the frame count they were
trained for (14 and 25), which is therefore a default, not a detected variant.

Where the released single file keeps each part:
    model.diffusion_model.                                  the UNet
    first_stage_model.                                      the autoencoder (no quant_conv)
    conditioner.embedders.0.open_clip.model.visual.         the image encoder, OpenCLIP layout
    conditioner.embedders.3.encoder.                        the encoder (+ quant_conv) the release conditions with
"""

from __future__ import annotations

from dataclasses import dataclass

from diffstudio.errors import InvalidInputError
from diffstudio.families.base import Defaults, Family, LatentFormat, Role

# The conditioning frame's encoder of the release (generative-models' VideoPredictionEmbedderWithEncoder, an
# AutoencoderKLModeOnly): an LDM encoder with quant_conv, its decoder unused.
COND_ENCODER_PREFIX = "conditioner.embedders.3.encoder."


@dataclass(frozen=True)
class EDMSchedule:
    """Continuous noise levels of an EDM-trained model (Karras et al. 2022): sigma in [sigma_min, sigma_max]."""

    sigma_min: float = 0.002
    sigma_max: float = 700.0


@dataclass(frozen=True)
class SVDDefaults:
    """The image-to-video settings of the reference pipelines (diffusers' StableVideoDiffusionPipeline)."""

    num_frames: int = 25  # SVD-XT; 14 for SVD
    fps: int = 7  # the model is told fps - 1
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_cfg: float = 1.0
    max_cfg: float = 3.0
    decode_chunk_size: int = 8


def check_unet(config) -> str | None:
    """The SVD UNet takes 8 channels (4 noisy latent + 4 of the conditioning frame) and gives 4."""
    in_channels, out_channels = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
    if in_channels != 8 or out_channels != 4:
        return f"in/out channels {in_channels}/{out_channels}; SVD's UNet has 8/4"
    return None


def conditioning(models, prompts, **_) -> dict:
    raise InvalidInputError("Stable Video Diffusion is conditioned on an image, not a prompt: use "
                            "diffstudio.video.svd.SVDPipeline(models)(image=...) or `diffstudio img2vid`")


SVD = Family(
    name="svd",
    denoiser_role="unet",
    roles=(
        Role("unet", "svd_unet", ("model.diffusion_model.",), "unet"),
        Role("vae", "svd_vae", ("first_stage_model.",), "vae"),
        Role("image_encoder", "clip_vision", ("conditioner.embedders.0.open_clip.model.visual.",), "image_encoder"),
    ),
    text_encoders=(),
    latent=LatentFormat(channels=4, scale=0.18215),
    prediction="edm_v",
    schedule=EDMSchedule(),
    defaults=Defaults(width=1024, height=576, steps=25, cfg_scale=3.0, sampler="euler", scheduler="karras"),
    check_denoiser=check_unet,
    make_conditioning=conditioning,
    diffusers_pipelines=("StableVideoDiffusionPipeline",),
    own_pipeline="diffstudio.video.svd:SVDPipeline",
    own_loader="diffstudio.video.svd_loading:load_svd",
)

SVD_DEFAULTS = SVDDefaults()
