"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer (diffstudio.models.flux) over the
16-channel latents of its own VAE, conditioned on T5-XXL hidden states (the token sequence) and on
CLIP-L's pooled embedding (the vector ``y``).

Two released variants, told apart by structure alone (``guidance_in`` weights present or not):

* **dev** is guidance-distilled: the guidance scale is an *input* (``guidance``, default 3.5) that the
  model embeds next to the timestep, so one forward gives a guided prediction and ``cfg_scale`` is 1.
  True CFG (cfg_scale > 1 with a negative prompt) still works on top: two forwards, as for any model.
  Its schedule shifts with resolution: shift = exp(mu), mu linear in the number of image tokens
  from 0.5 at 256 tokens to 1.15 at 4096 (``FlowSchedule(dynamic_shift=True)``); 28 steps; T5 reads
  512 tokens.
* **schnell** is timestep-distilled for 1-4 steps: no guidance input, a fixed shift of 1, T5 reads
  256 tokens.

The record keeps dev's settings and lists schnell's as a variant (``Family.variants``); the loader
hands the pipeline the record of the detected variant.

Latents: z = (vae_latent - 0.1159) * 0.3611 (the release's ``shift_factor`` / ``scale_factor``). The
transformer runs on tokens, each a 2x2 patch of the latent (``call_denoiser`` packs, builds the
position ids (0, row, col) and unpacks). Flow time t in [0, 1] goes in as is (the model multiplies
by 1000 itself), so the schedule's multiplier is 1.
"""

from __future__ import annotations

import warnings

import torch

from diffstudio.families.base import Defaults, Family, FlowSchedule, LatentFormat, Role, TextEncoderSpec

PATCH_CHANNELS = 16 * 2 * 2  # 16 latent channels, 2x2 patches
DEFAULT_GUIDANCE = 3.5
CLIP_L_HINTS = {"hidden_act": "quick_gelu"}  # OpenAI CLIP ViT-L/14


def check_dit(config) -> str | None:
    if config.in_channels != PATCH_CHANNELS:
        kind = {384: " (FLUX.1 Fill: image + mask channels)", 128: " (FLUX.1 Depth/Canny: control channels)"}
        return (f"the FLUX transformer takes {config.in_channels} input channels"
                f"{kind.get(config.in_channels, '')}; FLUX.1 dev/schnell take {PATCH_CHANNELS} (2x2 patches of "
                "16 latent channels); this variant is not supported yet")
    if config.out_channels != PATCH_CHANNELS:
        return f"the FLUX transformer outputs {config.out_channels} channels, FLUX.1 outputs {PATCH_CHANNELS}"
    return None


def variant_of(config) -> str:
    return "dev" if config.guidance_embed else "schnell"


# -- conditioning ---------------------------------------------------------------------------------


def conditioning(models, prompts: list[str], *, guidance: float | None = None, **_) -> dict:
    """context = T5-XXL hidden states (B, max_length, 4096); y = CLIP-L's pooled embedding (B, 768),
    the un-projected final-layer EOS feature; guidance (B,) for dev."""
    from diffstudio.conditioning.clip_encode import encode_clip
    from diffstudio.conditioning.prompt_input import parse_prompts
    from diffstudio.conditioning.t5_encode import encode_t5

    parsed = parse_prompts(prompts)  # once, for both encoders
    _, pooled = encode_clip(models.text_encoder, models.tokenizer, parsed, clip_skip=1, pooled=True,
                            embeddings=models.embeddings)
    # T5 over a fixed length (dev 512, schnell 256), without an attention mask, as in the release.
    context, _ = encode_t5(models.text_encoder_2, models.tokenizer_2, parsed,
                           max_length=models.family.text_encoders[1].max_length, embeddings=models.embeddings)
    cond = {"context": context, "y": pooled}
    if models.configs[models.family.denoiser_role].guidance_embed:
        scale = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        cond["guidance"] = torch.full((len(prompts),), scale)
    elif guidance is not None:
        warnings.warn(f"guidance={guidance} is ignored: FLUX.1 schnell has no guidance input (dev does); "
                      "use cfg_scale with a negative prompt for classifier-free guidance", stacklevel=3)
    return cond


def call_dit(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """(B, 16, H, W) latent -> packed tokens and ids -> the transformer -> (B, 16, H, W) velocity.

    An odd latent side (an image side that is a multiple of 8 but not of 16) is padded circularly by
    one row/column for the 2x2 packing (as ComfyUI does, and our SD3) and cropped again after.
    ``control`` (ControlNet residuals, which ``FluxControlNet`` computes on the same padded token grid)
    passes through to the transformer, as does ``ip`` (IP-Adapter keys and values per double block).
    """
    from diffstudio.models.flux import image_ids, pack_latents, pad_even, unpack_latents

    height, width = x.shape[-2:]
    x = pad_even(x)
    h, w = x.shape[-2:]
    txt = cond["context"]
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device)
    out = net(pack_latents(x), image_ids(h, w, x.device), txt, txt_ids, t, cond["y"], cond.get("guidance"),
              joint_bias=cond.get("joint_bias"), control=cond.get("control"), ip=cond.get("ip"))
    return unpack_latents(out, h, w)[..., :height, :width]


# -- the record -----------------------------------------------------------------------------------

CLIP_SPEC = TextEncoderSpec("text_encoder", "tokenizer", "clip")
DEV_T5 = TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", max_length=512)
SCHNELL_T5 = TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", max_length=256)

DEV_SCHEDULE = FlowSchedule(multiplier=1.0, dynamic_shift=True, base_seq=256, max_seq=4096, base_shift=0.5,
                            max_shift=1.15, patch=2)
SCHNELL_SCHEDULE = FlowSchedule(shift=1.0, multiplier=1.0)
DEV_DEFAULTS = Defaults(width=1024, height=1024, steps=28, cfg_scale=1.0, sampler="euler", scheduler="flow",
                        guidance=DEFAULT_GUIDANCE)
SCHNELL_DEFAULTS = Defaults(width=1024, height=1024, steps=4, cfg_scale=1.0, sampler="euler", scheduler="flow")

FLUX = Family(
    name="flux",
    denoiser_role="dit",
    roles=(
        # BFL's own files (flux1-dev.safetensors) hold the transformer alone with bare keys; ComfyUI's
        # all-in-one checkpoints bundle everything under these prefixes.
        Role("dit", "flux_dit", ("model.diffusion_model.",), "transformer"),
        Role("vae", "ldm_vae", ("vae.", "first_stage_model."), "vae"),
        Role("text_encoder", "clip_text", ("text_encoders.clip_l.transformer.",), "text_encoder",
             hints=CLIP_L_HINTS),
        Role("text_encoder_2", "t5_encoder", ("text_encoders.t5xxl.transformer.",), "text_encoder_2"),
    ),
    text_encoders=(CLIP_SPEC, DEV_T5),
    latent=LatentFormat(channels=16, scale=0.3611, shift=0.1159),
    prediction="flow",
    schedule=DEV_SCHEDULE,
    defaults=DEV_DEFAULTS,
    check_denoiser=check_dit,
    make_conditioning=conditioning,
    diffusers_pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    call_denoiser=call_dit,
    # LoRA targets in BFL's names (which the kohya export keeps): each double block's attention (fused qkv,
    # out proj) and MLP in both streams, each single block's linear1 (fused qkv + MLP in) and linear2 (attention
    # + MLP out): attention and MLP, as the common trainers do by default. kohya's sd-scripts also adapts the
    # adaLN modulation layers (img_mod.lin, txt_mod.lin, modulation.lin); pass targets= to include them.
    lora_targets=r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12]",
    variant_of=variant_of,
    controlnet_loader="diffstudio.flux_controlnet_loading:add_flux_controlnet",  # InstantX / diffusers layout
    variants={"schnell": {"schedule": SCHNELL_SCHEDULE, "defaults": SCHNELL_DEFAULTS,
                          "text_encoders": (CLIP_SPEC, SCHNELL_T5)}},
)
