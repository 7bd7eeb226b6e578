"""A tiny Stable Video Diffusion single file in the release's layout (svd.safetensors keys): the UNet (ours,
converted from diffusers' UNetSpatioTemporalConditionModel at a tiny config), the temporal VAE (diffusers',
converted), the conditioning encoder and the OpenCLIP ViT tower (transformers', converted), random weights.
Shared by the loading tests, the server's video job tests and the ExVideo trainer's tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from diffstudio.convert.clip_vision import vision_to_openclip
from diffstudio.convert.svd_vae import temporal_vae_from_diffusers


def randomise(module, scale: float = 0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


def write_svd_file(path: Path, seed: int = 0) -> Path:
    """A 32x32-capable SVD file at ``path`` (64-wide attention heads and a 1280-wide vision tower: the release's
    conventions, which shapes cannot show)."""
    from tests import test_svd_unet as tiny_unet

    torch.manual_seed(seed)
    unet_ref = tiny_unet.reference(dict(tiny_unet.TINY, block_out_channels=(64, 128), num_attention_heads=(1, 2)))
    _, unet_sd = tiny_unet.ours_from(unet_ref)
    encoder = randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16, image_size=32,
        patch_size=16, projection_dim=24)))
    vae = randomise(AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), layers_per_block=2,
                                                 down_block_types=("DownEncoderBlock2D",) * 2))
    vae_sd = temporal_vae_from_diffusers(vae.state_dict())
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae_sd.items() if not k.startswith("quant_conv")})
    sd.update({f"conditioner.embedders.3.encoder.{k}": v for k, v in vae_sd.items() if not k.startswith("decoder.")})
    sd.update({f"conditioner.embedders.0.open_clip.model.visual.{k}": v
               for k, v in vision_to_openclip(encoder.state_dict()).items()})
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    return path
