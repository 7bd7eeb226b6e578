"""Kolors (Kuaishou Kolors team 2024, "Kolors: Effective Training of Diffusion Model for Photorealistic
Text-to-Image Synthesis"): the SDXL UNet and VAE conditioned on ChatGLM3-6B instead of two CLIPs.

* Text: ChatGLM3-6B (diffstudio.models.chatglm), prompts of at most 256 tokens (per BREAK part,
  conditioning/chatglm_encode.py), left-padded. The
  UNet cross-attends to the *penultimate* hidden states (4096 wide), which its ``encoder_hid_proj``
  (diffusers' ``text_proj``) maps to the 2048-wide context. The pooled vector is the last block's
  output (before the final RMSNorm) at the last position, i.e. the prompt's final token.
* Vector ``y`` (SDXL's micro-conditioning, Podell et al. 2023, sec. 2.2): pooled (4096) followed by
  six sinusoidal embeddings (256 each) of original size (h, w), crop top-left (0, 0) and target size
  (h, w): 4096 + 1536 = 5632 = the UNet's ``label_emb`` input width.
* Schedule: scaled-linear betas from 0.00085 to 0.014 over 1100 training steps (Kolors' own, the
  released scheduler_config.json), epsilon prediction. VAE: SDXL's (scale 0.13025).

Structural signature of the UNet: an ``encoder_hid_proj`` (no SD / SDXL UNet has one) and a ``y``
embedding whose width is encoder_hid_dim + 6 x (size-embedding width).
"""

from __future__ import annotations

import torch

from diffstudio.conditioning.chatglm_encode import encode_chatglm
from diffstudio.families.base import (
    Defaults,
    DiscreteSchedule,
    Family,
    LatentFormat,
    Role,
    TextEncoderSpec,
)
from diffstudio.families.sd15 import LDM_UNET_LORA_TARGETS

MAX_TOKENS = 256  # the Kolors pipeline's max_sequence_length
SIZE_CONDITIONS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def size_embedding_width(config) -> int:
    """Width of one size/crop embedding: (adm_in_channels - pooled width) / 6 (released Kolors: 256)."""
    return (config.adm_in_channels - config.encoder_hid_dim) // SIZE_CONDITIONS


def check_unet(config) -> str | None:
    if not config.context_dim:
        return "the UNet has no cross-attention (no attn2 keys), so it takes no text"
    if config.encoder_hid_dim is None:
        return "the UNet has no encoder_hid_proj (Kolors maps ChatGLM's 4096-wide states to the context with one)"
    if config.adm_in_channels is None:
        return "the UNet has no `y` embedding (label_emb); Kolors conditions on pooled text + size embeddings"
    extra = config.adm_in_channels - config.encoder_hid_dim
    if extra <= 0 or extra % (2 * SIZE_CONDITIONS):
        return (f"the UNet's `y` width {config.adm_in_channels} is not the text width {config.encoder_hid_dim} plus "
                "six even-width size embeddings (Kolors: 4096 + 6 x 256 = 5632)")
    if config.in_channels not in (4, 9) or config.out_channels != 4:
        return f"in/out channels {config.in_channels}/{config.out_channels}, Kolors has 4 (or 9 for inpainting)/4"
    return None


def size_embeddings(width: int, height: int, batch: int, dim: int) -> torch.Tensor:
    """(B, 6 * dim): sinusoidal embeddings (cos first, as the UNet's timestep embedding) of
    (original h, original w, crop top, crop left, target h, target w) = (h, w, 0, 0, h, w)."""
    from diffstudio.models.layers import timestep_embedding

    values = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return timestep_embedding(values, dim).reshape(1, SIZE_CONDITIONS * dim).expand(batch, -1)


def conditioning(models, prompts: list[str], *, clip_skip: int, width: int, height: int, **_) -> dict:
    """Kolors: context = ChatGLM's penultimate states, y = [pooled, size embeddings]."""
    context, pooled = encode_chatglm(models.text_encoder, models.tokenizer, prompts, clip_skip=clip_skip,
                                     embeddings=models.embeddings)
    unet_config = models.configs[KOLORS.denoiser_role]
    sizes = size_embeddings(width, height, len(prompts), size_embedding_width(unet_config))
    y = torch.cat([pooled.float(), sizes.to(pooled.device)], dim=-1)  # (B, 5632)
    return {"context": context, "y": y}


KOLORS = Family(
    name="kolors",
    denoiser_role="unet",
    roles=(
        Role("unet", "ldm_unet", ("model.diffusion_model.",), "unet", hints={"num_head_channels": 64}),
        Role("vae", "ldm_vae", ("first_stage_model.",), "vae"),
        # No released single file bundles the text encoder; this is the prefix diffstudio writes.
        Role("text_encoder", "chatglm", ("text_encoders.chatglm.",), "text_encoder", hints={"kv_channels": 128}),
    ),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "chatglm", default_clip_skip=2,
                                   max_length=MAX_TOKENS),),
    latent=LatentFormat(channels=4, scale=0.13025),
    prediction="eps",
    schedule=DiscreteSchedule(beta_start=0.00085, beta_end=0.014, num_steps=1100, kind="scaled_linear"),
    # Kolors' examples: 1024x1024, guidance 5.0, 50 Euler steps. 30 steps of Euler on the "normal"
    # schedule are close to converged; pass steps=50 to match the examples.
    defaults=Defaults(width=1024, height=1024, steps=30, cfg_scale=5.0, sampler="euler", scheduler="normal"),
    check_denoiser=check_unet,
    make_conditioning=conditioning,
    concat_channels=lambda config: config.in_channels - 4,
    lora_targets=LDM_UNET_LORA_TARGETS,
    diffusers_pipelines=("KolorsPipeline", "KolorsImg2ImgPipeline"),
)
