"""CogVideoX (Yang et al. 2024, arXiv:2408.06072): text-to-video with an expert transformer
(diffstudio.models.cogvideo) over the 16-channel latents of a causal 3D VAE (8x spatial, 4x temporal
compression: 4k + 1 frames -> k + 1 latent frames), conditioned on T5-XXL's last hidden state over 226
tokens (no attention mask, as released).

Training: v-prediction on a scaled-linear DDPM schedule (0.00085 .. 0.012, 1000 steps) rescaled to zero
terminal SNR, its SNR first divided by ``snr_shift_scale`` (2B: 3, 5B: 1); sampled with DDIM (or the
release's DPM) over "trailing" timesteps (sampling/zero_snr.py). The video pipeline is video/cogvideo.py.

Variants, told apart by the transformer's structure:
* **2b**: 1920 wide, sinusoidal positions; VAE scaling factor 1.15258426, snr_shift_scale 3.
* **5b**: 3072 wide, 3D RoPE; VAE scaling factor 0.7, snr_shift_scale 1. The 5B-I2V model (32 input channels:
  noise + image latents, a learned position table) and CogVideoX 1.5 (temporal patches; its I2V model adds the
  "ofs" embedding) load with 5B's settings; video/cogvideo.py supplies the image latents.

Canonical names are diffusers' (the released folders' ``transformer/``, ``text_encoder/``, ``vae/``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffstudio.families.base import Defaults, DiscreteSchedule, Family, LatentFormat, Role, TextEncoderSpec

TEXT_TOKENS = 226
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class ZeroSNRSchedule(DiscreteSchedule):
    """A scaled-linear schedule with CogVideoX's SNR shift, rescaled to zero terminal SNR."""

    snr_shift_scale: float = 1.0
    zero_terminal_snr: bool = True
    spacing: str = "trailing"

    def alphas_cumprod(self) -> torch.Tensor:
        from diffstudio.sampling.zero_snr import cogvideo_alphas_cumprod

        return cogvideo_alphas_cumprod(self.beta_start, self.beta_end, self.num_steps, self.snr_shift_scale,
                                       self.zero_terminal_snr)


def check_dit(config) -> str | None:
    if config.out_channels != LATENT_CHANNELS:
        return f"the CogVideoX transformer gives {config.out_channels} channels; CogVideoX latents have 16"
    if config.in_channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS):
        return (f"the CogVideoX transformer takes {config.in_channels} channels (16: text-to-video, 32: "
                "image-to-video); this variant is not supported")
    return None


def variant_of(config) -> str:
    if config.patch_size_t is not None:
        return "1.5-i2v" if config.in_channels == 2 * LATENT_CHANNELS else "1.5"
    if not config.use_rotary_positional_embeddings:
        return "2b"
    return "5b-i2v" if config.in_channels == 2 * LATENT_CHANNELS else "5b"


def conditioning(models, prompts: list[str], **_) -> dict:
    """context = T5-XXL's last hidden state (B, 226, 4096), padded to 226 tokens, no attention mask."""
    from diffstudio.conditioning.t5_encode import encode_t5

    spec = models.family.text_encoders[0]
    context, _ = encode_t5(models.text_encoder, models.tokenizer, prompts, max_length=spec.max_length,
                           embeddings=models.embeddings)
    return {"context": context}


def call_dit(net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """x (B, F, 16, h, w) latents (frames before channels, as the release) -> v of the same shape."""
    return net(x, cond["context"], t, ofs=cond.get("ofs"))


SCHEDULE_2B = ZeroSNRSchedule(snr_shift_scale=3.0)
SCHEDULE_5B = ZeroSNRSchedule(snr_shift_scale=1.0)
LATENT_2B = LatentFormat(channels=LATENT_CHANNELS, scale=1.15258426)
LATENT_5B = LatentFormat(channels=LATENT_CHANNELS, scale=0.7)
FIVE_B = {"schedule": SCHEDULE_5B, "latent": LATENT_5B}

COGVIDEOX = Family(
    name="cogvideox",
    denoiser_role="transformer",
    roles=(
        # Released as diffusers folders; a lone transformer file holds diffusers' names, bare.
        Role("transformer", "cogvideo_dit", ("transformer.",), "transformer"),
        Role("text_encoder", "t5_encoder", ("text_encoders.t5xxl.transformer.", "text_encoder."), "text_encoder"),
        # The causal 3D VAE (models/cogvideo_vae.py); a pipeline can run without it and return latents.
        Role("vae", "cogvideox_vae", ("vae.",), "vae", required=False),
    ),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "t5", max_length=TEXT_TOKENS),),
    latent=LATENT_2B,
    prediction="v",
    schedule=SCHEDULE_2B,
    defaults=Defaults(width=720, height=480, steps=50, cfg_scale=6.0, sampler="ddim", scheduler="trailing"),
    check_denoiser=check_dit,
    make_conditioning=conditioning,
    diffusers_pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    call_denoiser=call_dit,
    # The attention projections of every block: the released ExVideo-CogVideoX LoRA's targets (PEFT names).
    lora_targets=r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    variant_of=variant_of,
    own_pipeline="diffstudio.video.cogvideo:CogVideoPipeline",
    lora_trainer="diffstudio.train.cogvideo_lora:train_cogvideo_lora",
    variants={"5b": FIVE_B, "5b-i2v": FIVE_B, "1.5": FIVE_B, "1.5-i2v": FIVE_B},
)
