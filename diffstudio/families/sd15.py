"""Stable Diffusion 1.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): LDM UNet conditioned on CLIP ViT-L/14 hidden states, 4-channel VAE,
epsilon prediction on the scaled-linear DDPM schedule.

Structural signature of the UNet: cross-attention, no class/`y` embedding, and 1x1
*convolution* proj_in/proj_out in the transformer blocks (SD 2.x uses linear ones).
"""

from __future__ import annotations

from diffstudio.families.base import (
    Defaults,
    DiscreteSchedule,
    Family,
    LatentFormat,
    Role,
    TextEncoderSpec,
)

LDM_UNET_LORA_TARGETS = (r".*\.\d+\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                         r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
                         r"|middle_block\.1\.(proj_in|proj_out|transformer_blocks\.\d+\."
                         r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")


def check_unet(config) -> str | None:
    if not config.context_dim:
        return "the UNet has no cross-attention (no attn2 keys), so it takes no text"
    if config.adm_in_channels:
        return f"the UNet has a `y` embedding of width {config.adm_in_channels} (label_emb): SDXL-style"
    if config.use_linear_in_transformer:
        return "the UNet's transformer proj_in is linear: SD 2.x / SDXL layout, not SD 1.x"
    if config.in_channels not in (4, 9) or config.out_channels != 4:
        return f"in/out channels {config.in_channels}/{config.out_channels}, SD 1.x has 4 (or 9 for inpainting)/4"
    return None


def conditioning(models, prompts: list[str], *, clip_skip: int, **_) -> dict:
    """SD 1.x cross-attends to CLIP-L's hidden states; there is no pooled vector."""
    from diffstudio.conditioning.clip_encode import encode_clip

    hidden, _ = encode_clip(models.text_encoder, models.tokenizer, prompts, clip_skip=clip_skip,
                            embeddings=models.embeddings)
    return {"context": hidden}


SD15 = Family(
    name="sd15",
    denoiser_role="unet",
    roles=(
        Role("unet", "ldm_unet", ("model.diffusion_model.",), "unet", hints={"num_heads": 8}),
        Role("vae", "ldm_vae", ("first_stage_model.",), "vae"),
        Role("text_encoder", "clip_text", ("cond_stage_model.transformer.", "cond_stage_model.model."),
             "text_encoder", hints={"hidden_act": "quick_gelu"}),
    ),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "clip"),),
    latent=LatentFormat(channels=4, scale=0.18215),
    prediction="eps",
    schedule=DiscreteSchedule(beta_start=0.00085, beta_end=0.012, num_steps=1000, kind="scaled_linear"),
    defaults=Defaults(width=512, height=512, steps=25, cfg_scale=7.0, sampler="euler", scheduler="normal"),
    check_denoiser=check_unet,
    make_conditioning=conditioning,
    concat_channels=lambda config: config.in_channels - 4,
    # What kohya's sd-scripts trains in the UNet: the spatial transformers' projections and attention
    # and feed-forward layers (the LoRA then loads in A1111, ComfyUI and diffusers alike).
    lora_targets=LDM_UNET_LORA_TARGETS,
    diffusers_pipelines=("StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                         "StableDiffusionImg2ImgPipeline"),
    # AnimateDiff v1-v3 for SD 1.x were trained and are sampled on the *linear* betas (its
    # configs/inference/inference-v*.yaml: beta_start 0.00085, beta_end 0.012, "linear").
    motion_schedule=DiscreteSchedule(beta_start=0.00085, beta_end=0.012, num_steps=1000, kind="linear"),
)
