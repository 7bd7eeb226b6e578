"""Stable Diffusion XL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", arXiv:2307.01952): the base model and the refiner.

Both are LDM UNets (diffstudio.models.unet) over the same 4-channel VAE latents, epsilon
prediction on the scaled-linear DDPM schedule. What makes them SDXL is their conditioning:

* context (section 2.1): the penultimate hidden states of the text encoders, taken *without*
  the final layer norm, concatenated on the feature axis. Base: CLIP ViT-L (768) and OpenCLIP
  ViT-bigG (1280) -> 2048. Refiner (section 2.5): bigG alone -> 1280.
* the vector ``y`` (fed through the UNet's ``label_emb`` and added to the time embedding):
  bigG's pooled text embedding (its final-layer-normed EOS state through ``text_projection``),
  followed by Fourier embeddings of scalar "micro-conditions" (section 2.2), each embedded like a
  timestep (cos/sin, 256 wide in the release):
      base:    [pooled, original (h, w), crop (top, left), target (h, w)] -> 1280 + 6 * 256 = 2816
      refiner: [pooled, original (h, w), crop (top, left), aesthetic score] -> 1280 + 5 * 256 = 2560

Structural signature, read off the UNet's derived config and never off its widths (a tiny model
and a released one differ only in shapes):
  * a ``y`` embedding (``label_emb``), linear proj_in/proj_out and cross-attention;
  * no ``encoder_hid_proj`` (that is Kolors, which projects ChatGLM's states into the context);
  * no transformer blocks at the highest-resolution level (SDXL removed them, section 2.1; SD 2.x
    unCLIP, also a linear UNet with a ``y``, keeps them);
  * base: transformer blocks at the lowest-resolution level (depths [0, 2, 10] over three levels);
    refiner: none there (depths [0, 4, 4, 0] over four levels).
The Fourier width (256) is derived too: (``adm_in_channels`` - pooled width) / number of values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from diffstudio.families.base import (
    Defaults,
    DiscreteSchedule,
    Family,
    LatentFormat,
    Role,
    TextEncoderSpec,
)
from diffstudio.families.sd15 import LDM_UNET_LORA_TARGETS

# Conventions shapes cannot reveal (ARCHITECTURE.md, principle 2).
UNET_HINTS = {"num_head_channels": 64}  # SDXL: 64-channel heads at every width
CLIP_L_HINTS = {"hidden_act": "quick_gelu"}  # OpenAI CLIP ViT-L/14
BIGG_HINTS = {"hidden_act": "gelu"}  # OpenCLIP ViT-bigG/14

# Micro-conditioning defaults of the reference sampling code: no crop; the refiner is told its
# input is aesthetically good (6.0). The reference gives the *negative* rows 2.5, which needs to
# know which rows are negatives; make_conditioning only sees a batch of prompts, so every row gets
# ``aesthetic_score`` (docs/families.md, "SDXL").
DEFAULT_CROP_TOP_LEFT = (0, 0)
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


# --------------------------------------------------------------------------------------------
# Structural tests
# --------------------------------------------------------------------------------------------


def _xl_unet_reason(config) -> str | None:
    """Why a UNet is not an SDXL-style UNet (base or refiner), or None."""
    if not config.context_dim:
        return "the UNet has no cross-attention (no attn2 keys), so it takes no text"
    if not config.adm_in_channels:
        return "the UNet has no `y` embedding (no label_emb keys): SDXL conditions on a pooled-text + size vector"
    if not config.use_linear_in_transformer:
        return "the UNet's transformer proj_in is a 1x1 convolution (SD 1.x layout); SDXL's is linear"
    if config.encoder_hid_dim:
        return (f"the UNet projects a {config.encoder_hid_dim}-wide text encoder into its context "
                "(encoder_hid_proj): Kolors-style, not SDXL")
    if config.transformer_depth[0]:
        return ("the UNet has transformer blocks at full latent resolution; SDXL has none there "
                "(SD 2.x unCLIP-style layout)")
    if config.in_channels not in (4, 9) or config.out_channels != 4:
        return f"in/out channels {config.in_channels}/{config.out_channels}, SDXL has 4 (or 9 for inpainting)/4"
    return None


def check_base_unet(config) -> str | None:
    reason = _xl_unet_reason(config)
    if reason is None and not config.transformer_depth[-1]:
        reason = (f"the UNet has no transformer blocks at its lowest resolution (depths "
                  f"{config.transformer_depth}): the SDXL refiner's layout, not the base's")
    return reason


def check_refiner_unet(config) -> str | None:
    reason = _xl_unet_reason(config)
    if reason is None and config.transformer_depth[-1]:
        reason = (f"the UNet has transformer blocks at its lowest resolution (depths "
                  f"{config.transformer_depth}): the SDXL base's layout, not the refiner's")
    return reason


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------


def fourier_width(adm_in_channels: int, pooled_width: int, num_values: int) -> int:
    """Width of each micro-condition's embedding: the rest of ``y`` after the pooled text, split evenly."""
    from diffstudio.errors import UnknownModelError

    rest = adm_in_channels - pooled_width
    if rest <= 0 or rest % num_values:
        raise UnknownModelError(
            f"the UNet's vector input is {adm_in_channels} wide, the pooled text embedding {pooled_width}: "
            f"the remaining {rest} do not split into {num_values} size embeddings. The text encoder does not "
            "belong to this UNet; load the model's own text_encoder_2 (OpenCLIP bigG with its projection).")
    return rest // num_values


def vector_condition(pooled: torch.Tensor, values: Sequence[float] | torch.Tensor,
                     adm_in_channels: int) -> torch.Tensor:
    """SDXL's ``y``: pooled (B, P) and micro-conditions -> (B, adm_in_channels), float32.

    ``values`` are the scalars in order (base: orig h, orig w, crop top, crop left, target h,
    target w; refiner: orig h, orig w, crop top, crop left, aesthetic score), shape (n,) for every
    row or (B, n) per row. Each is embedded like a timestep (LDM's [cos, sin] order, frequencies
    10000^(-i/half)) and the embeddings are laid side by side after the pooled text.
    """
    from diffstudio.models.layers import timestep_embedding

    batch = pooled.shape[0]
    values = torch.as_tensor(values, dtype=torch.float32, device=pooled.device)
    values = values.expand(batch, -1) if values.ndim == 1 else values                  # (B, n)
    width = fourier_width(adm_in_channels, pooled.shape[1], values.shape[1])
    embedded = timestep_embedding(values.reshape(-1), width).reshape(batch, -1)      # (B, n * width)
    return torch.cat([pooled.float(), embedded], dim=-1)


def _size_values(width: int, height: int, original_size, crop_top_left) -> list[float]:
    original_h, original_w = original_size if original_size is not None else (height, width)
    return [original_h, original_w, *crop_top_left]


def conditioning(models, prompts: list[str], *, clip_skip: int, width: int, height: int,
                 original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = DEFAULT_CROP_TOP_LEFT, **_) -> dict:
    """SDXL base: context = [CLIP-L, bigG] states; y = [pooled bigG, original, crop, target size].

    ``original_size`` (h, w) defaults to the target size (the image being made), as in the reference.
    """
    from diffstudio.conditioning.clip_encode import encode_clip_concat

    context, (_, pooled) = encode_clip_concat(
        [(models.text_encoder, models.tokenizer), (models.text_encoder_2, models.tokenizer_2)], prompts,
        clip_skip=clip_skip, layer_norm_on_skip=False, embeddings=models.embeddings)
    values = _size_values(width, height, original_size, crop_top_left) + [height, width]
    return {"context": context, "y": vector_condition(pooled, values, models.unet.config.adm_in_channels)}


def refiner_conditioning(models, prompts: list[str], *, clip_skip: int, width: int, height: int,
                         original_size: tuple[int, int] | None = None,
                         crop_top_left: tuple[int, int] = DEFAULT_CROP_TOP_LEFT,
                         aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
                         negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE,
                         n_positive: int | None = None, **_) -> dict:
    """SDXL refiner: context = bigG states; y = [pooled bigG, original size, crop, aesthetic score].

    The pipeline encodes prompts and negatives in one batch and says how many rows are prompts
    (``n_positive``); the negatives' rows get ``negative_aesthetic_score`` (2.5 in the reference), so
    guidance pushes away from a low aesthetic score as well as from the negative text.
    """
    from diffstudio.conditioning.clip_encode import encode_clip_concat

    context, (pooled,) = encode_clip_concat([(models.text_encoder_2, models.tokenizer_2)], prompts,
                                            clip_skip=clip_skip, layer_norm_on_skip=False,
                                            embeddings=models.embeddings)
    sizes = _size_values(width, height, original_size, crop_top_left)
    n_positive = len(prompts) if n_positive is None else n_positive
    values = torch.tensor([sizes + [aesthetic_score if row < n_positive else negative_aesthetic_score]
                           for row in range(len(prompts))], dtype=torch.float32)      # (B, 5)
    return {"context": context, "y": vector_condition(pooled, values, models.unet.config.adm_in_channels)}


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------

UNET = Role("unet", "ldm_unet", ("model.diffusion_model.",), "unet", hints=UNET_HINTS)
VAE = Role("vae", "ldm_vae", ("first_stage_model.",), "vae")
# SDXL's text is read at the penultimate layer (clip_skip 2 in A1111's counting), without the final norm.
BIGG_SPEC = TextEncoderSpec("text_encoder_2", "tokenizer_2", "clip_g", default_clip_skip=2)
LATENT = LatentFormat(channels=4, scale=0.13025)  # SDXL VAE (and the fp16-fix VAE): scale_factor 0.13025
SCHEDULE = DiscreteSchedule(beta_start=0.00085, beta_end=0.012, num_steps=1000, kind="scaled_linear")
DEFAULTS = Defaults(width=1024, height=1024, steps=30, cfg_scale=7.0, sampler="euler", scheduler="normal")

SDXL = Family(
    name="sdxl",
    denoiser_role="unet",
    roles=(
        UNET,
        VAE,
        Role("text_encoder", "clip_text", ("conditioner.embedders.0.transformer.",), "text_encoder",
             hints=CLIP_L_HINTS, width=768),
        Role("text_encoder_2", "clip_text", ("conditioner.embedders.1.model.",), "text_encoder_2",
             hints=BIGG_HINTS, width=1280),
    ),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "clip", default_clip_skip=2), BIGG_SPEC),
    latent=LATENT,
    prediction="eps",
    schedule=SCHEDULE,
    defaults=DEFAULTS,
    check_denoiser=check_base_unet,
    make_conditioning=conditioning,
    concat_channels=lambda config: config.in_channels - 4,
    lora_targets=LDM_UNET_LORA_TARGETS,  # the LDM UNet's transformer layers, as kohya's sd-scripts train them
    # Only the txt2img class is the base's alone: StableDiffusionXLImg2ImgPipeline (and the inpaint
    # one) also holds refiners, so those folders are placed by their UNet's structure.
    diffusers_pipelines=("StableDiffusionXLPipeline",),
    # AnimateDiff's SDXL beta module: scaled-linear betas up to 0.020 (the sdxl branch's
    # configs/inference/inference.yaml), not SDXL's own 0.012.
    motion_schedule=DiscreteSchedule(beta_start=0.00085, beta_end=0.020, num_steps=1000, kind="scaled_linear"),
)

# The refiner shares the base's UNet, VAE, latent format, schedule and defaults; it differs in its text
# encoder, its structural test and its `y`.
SDXL_REFINER = replace(
    SDXL,
    name="sdxl_refiner",
    roles=(
        UNET,
        VAE,
        # The refiner's only text encoder is bigG, first in its conditioner; diffusers names it text_encoder_2.
        Role("text_encoder_2", "clip_text", ("conditioner.embedders.0.model.",), "text_encoder_2",
             hints=BIGG_HINTS),
    ),
    text_encoders=(BIGG_SPEC,),
    check_denoiser=check_refiner_unet,
    make_conditioning=refiner_conditioning,
    diffusers_pipelines=(),
)
