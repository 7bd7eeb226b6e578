"""A tiny Stable Diffusion 1.x built with the reference libraries (diffusers, transformers).

Random weights (never zeros), SD 1.x conventions (8 UNet heads, CLIP head width 64,
32 norm groups, 8x VAE downscale) at small widths, so detection by shape works exactly
as it does on the real model. Written both as a diffusers folder and as an
original-layout single file (through our converters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
           latent_channels=4, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights (never zeros): norm weights near 1, others scaled by fan-in. Shared by
    every tiny_* fixture builder."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # norms: around 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))


def reference_models(in_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**{**UNET, "in_channels": in_channels})
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**CLIP))
    for i, m in enumerate((unet, vae, text)):
        randomise(m, seed + i)
        m.eval()
    return unet, vae, text


def write_diffusers_folder(folder: Path, unet, vae, text) -> Path:
    from diffusers import EulerDiscreteScheduler

    from diffstudio.conditioning.tokenizers import load_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    load_clip_tokenizer().save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def original_layout_state_dict(unet, vae, text) -> dict[str, torch.Tensor]:
    """The single-file ("civitai") layout, produced by our diffusers -> original converters."""
    from diffstudio.convert.clip import canonical_clip_keys
    from diffstudio.convert.unet import unet_from_diffusers
    from diffstudio.convert.vae import vae_from_diffusers

    sd = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet_from_diffusers(unet.state_dict()).items()})
    sd.update({"first_stage_model." + k: v for k, v in vae_from_diffusers(vae.state_dict()).items()})
    clip = canonical_clip_keys(text.state_dict())
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
    # Released files carry schedule buffers too; detection must ignore them.
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    return sd


def write_single_file(path: Path, unet, vae, text, dtype=None) -> Path:
    from safetensors.torch import save_file

    sd = original_layout_state_dict(unet, vae, text)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
