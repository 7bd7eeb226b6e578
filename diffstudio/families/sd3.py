"""Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", arXiv:2403.03206): an MMDiT (diffstudio.models.mmdit) over the
16-channel latents of its own VAE, trained as a rectified flow (velocity prediction, t = 1000 sigma)
with a static timestep shift of 3 (section 5.3.2, eq. 23).

Conditioning (section 3.2 / appendix B.2; as diffusers' StableDiffusion3Pipeline.encode_prompt):
* context (B, 77 + 256, 4096): CLIP ViT-L (768) and OpenCLIP bigG (1280) penultimate hidden
  states, *without* the final layer norm, side by side on the feature axis (768 + 1280 = 2048),
  zero-padded on the feature axis to T5's width 4096; then, along the token axis, T5-XXL's last
  hidden state over 256 tokens. T5 is optional (the paper drops it at inference to save memory,
  section 5.3.3): without it that part is 77 tokens of zeros.
* y (B, 2048): the two encoders' pooled embeddings (final-layer EOS feature through each one's
  text_projection) side by side.
Long prompts: CLIP reads 75-token chunks (A1111 convention, conditioning/clip_encode.py), so the
CLIP part grows by 77 tokens per chunk; T5 reads the first 256 tokens.

Variants, by the MMDiT's structure: SD3-medium (plain), SD3.5-large (QK RMSNorm), SD3.5-medium
(QK RMSNorm + MMDiT-X dual attention in its first 13 blocks). They differ in recommended guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffstudio.errors import UnknownModelError
from diffstudio.families.base import Defaults, Family, FlowSchedule, LatentFormat, Role, TextEncoderSpec

CLIP_L_HINTS = {"hidden_act": "quick_gelu"}  # OpenAI CLIP ViT-L/14
CLIP_G_HINTS = {"hidden_act": "gelu"}  # OpenCLIP ViT-bigG/14
NO_T5_TOKENS = 77  # length of the zero "T5" part when T5 is not loaded (as the reference pipeline)


def check_dit(config) -> str | None:
    if config.in_channels != 16 or config.out_channels != 16:
        return f"the MMDiT takes {config.in_channels} and gives {config.out_channels} channels; SD3 latents have 16"
    if not config.adm_in_channels:
        return "the MMDiT has no pooled-text embedder (y_embedder); SD3 conditions on pooled CLIP embeddings"
    return None


def variant_of(config) -> str:
    if config.dual_attention_layers:
        return "sd3.5-medium"
    return "sd3.5-large" if config.qk_norm else "sd3-medium"


def conditioning(models, prompts: list[str], *, clip_skip: int, **_) -> dict:
    """context = [CLIP-L ⊕ CLIP-G (zero-padded to the T5 width); T5] tokens, y = [pooled L, pooled G]."""
    from diffstudio.conditioning.clip_encode import encode_clip_concat
    from diffstudio.conditioning.prompt_input import parse_prompts
    from diffstudio.conditioning.t5_encode import encode_t5

    dit = models.configs[models.family.denoiser_role]
    width = dit.context_in_dim
    parsed = parse_prompts(prompts)  # once, for the three encoders
    clip, pooled = encode_clip_concat(
        [(models.text_encoder, models.tokenizer), (models.text_encoder_2, models.tokenizer_2)], parsed,
        clip_skip=clip_skip, layer_norm_on_skip=False, embeddings=models.embeddings)
    if clip.shape[-1] > width:
        raise UnknownModelError(f"the CLIP encoders give {clip.shape[-1]} features together but the MMDiT reads "
                                f"{width}: these text encoders do not belong to this model")
    clip = F.pad(clip.float(), (0, width - clip.shape[-1]))  # (B, 77n, 2048) -> (B, 77n, 4096)
    t5 = models.components.get("text_encoder_3")
    if t5 is not None:
        spec = next(s for s in models.family.text_encoders if s.encoder_role == "text_encoder_3")
        t5_hidden, _ = encode_t5(t5, models.tokenizer_3, parsed, max_length=spec.max_length,  # (B, 256, 4096)
                                 embeddings=models.embeddings)
        if t5_hidden.shape[-1] != width:
            raise UnknownModelError(f"T5 gives {t5_hidden.shape[-1]} features but the MMDiT reads {width}: this "
                                    "T5 does not belong to this model (SD3 uses T5-XXL, 4096 wide)")
        t5_hidden = t5_hidden.float().to(clip.device)
    else:
        t5_hidden = clip.new_zeros(len(prompts), NO_T5_TOKENS, width)
    y = torch.cat([p.float() for p in pooled], dim=-1)  # (B, 768 + 1280)
    if y.shape[-1] != dit.adm_in_channels:
        raise UnknownModelError(f"the pooled CLIP embeddings are {y.shape[-1]} wide together, the MMDiT reads "
                                f"{dit.adm_in_channels}: load the model's own CLIP-L and CLIP-G (with projections)")
    return {"context": torch.cat([clip, t5_hidden], dim=1), "y": y}


def call_dit(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The MMDiT's original forward. A latent side that is not a multiple of the 2x2 patch (an image
    side that is a multiple of 8 but not of 16) is padded circularly, as ComfyUI's MMDiT does, and the
    output cropped back. ``control``: an SD3 ControlNet's residuals over the (padded) image tokens."""
    height, width = x.shape[-2:]
    p = net.config.patch_size
    pad_h, pad_w = -height % p, -width % p
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    return net(x, t, cond["y"], cond["context"], joint_bias=cond.get("joint_bias"),
               control=cond.get("control"))[..., :height, :width]


SCHEDULE = FlowSchedule(shift=3.0, multiplier=1000.0)
# Each variant gets its model card's recommendation (SD3-medium: 28 steps, cfg 7; SD3.5-large: 28 steps,
# cfg 3.5; SD3.5-medium: 40 steps, cfg 4.5); the family default sits between them.
DEFAULTS = Defaults(width=1024, height=1024, steps=28, cfg_scale=4.5, sampler="euler", scheduler="flow")
VARIANT_DEFAULTS = {
    "sd3-medium": Defaults(width=1024, height=1024, steps=28, cfg_scale=7.0, sampler="euler", scheduler="flow"),
    "sd3.5-large": Defaults(width=1024, height=1024, steps=28, cfg_scale=3.5, sampler="euler", scheduler="flow"),
    "sd3.5-medium": Defaults(width=1024, height=1024, steps=40, cfg_scale=4.5, sampler="euler", scheduler="flow"),
}

SD3 = Family(
    name="sd3",
    denoiser_role="dit",
    roles=(
        Role("dit", "mmdit", ("model.diffusion_model.",), "transformer"),
        Role("vae", "ldm_vae", ("first_stage_model.",), "vae"),
        Role("text_encoder", "clip_text", ("text_encoders.clip_l.transformer.",), "text_encoder",
             hints=CLIP_L_HINTS, width=768),
        Role("text_encoder_2", "clip_text", ("text_encoders.clip_g.transformer.",), "text_encoder_2",
             hints=CLIP_G_HINTS, width=1280),
        Role("text_encoder_3", "t5_encoder", ("text_encoders.t5xxl.transformer.",), "text_encoder_3",
             required=False),
    ),
    # Penultimate CLIP layers (clip_skip 2 in A1111's counting), without the final norm.
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "clip", default_clip_skip=2),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "clip_g", default_clip_skip=2),
        TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", max_length=256),
    ),
    latent=LatentFormat(channels=16, scale=1.5305, shift=0.0609),
    prediction="flow",
    schedule=SCHEDULE,
    defaults=DEFAULTS,
    check_denoiser=check_dit,
    make_conditioning=conditioning,
    diffusers_pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                         "StableDiffusion3InpaintPipeline"),
    call_denoiser=call_dit,
    # LoRA targets in SD3's own names (which the kohya export keeps): attention (fused qkv, out proj; attn2 of
    # the MMDiT-X blocks) and MLP of both streams of every joint block; the adaLN modulation is left out.
    lora_targets=r"joint_blocks\.\d+\.(context|x)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])",
    variant_of=variant_of,
    variants={name: {"defaults": d} for name, d in VARIANT_DEFAULTS.items()},
    # InstantX's SD3 ControlNets and Stability's SD3.5 ones (models/sd3_controlnet.py, docs/controlnet.md).
    controlnet_loader="diffstudio.sd3_controlnet_loading:add_sd3_controlnet",
)
