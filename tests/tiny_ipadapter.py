"""Tiny IP-Adapter fixtures: diffusers UNets at SD 1.x / SDXL-like layouts with our converted twins, IP-Adapter
state dicts in the released names (base, Plus, full-face) for them, and a tiny CLIP vision encoder."""

from __future__ import annotations

import torch

from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.models.ipadapter import IPAdapter, IPAdapterConfig
from diffstudio.models.unet import UNetModel

TEXT = 24  # the tiny UNets' text width (cross_attention_dim)
UNETS = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=TEXT,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=2, norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 64, 96), layers_per_block=1, cross_attention_dim=TEXT,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 2, 2),
                 use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}
EMBED = 20  # the tiny image encoder's projection_dim (what base adapters read)
HIDDEN = 32  # its hidden size (what Plus / full-face adapters read)
VISION = dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=EMBED, hidden_act="gelu")


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Seeded random weights everywhere (no zero-initialised layer hiding a wrong path): norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def unets(kind: str, seed: int = 0):
    """(diffusers UNet2DConditionModel, our UNetModel with the same weights)."""
    from diffusers import UNet2DConditionModel

    ref = randomize(UNet2DConditionModel(sample_size=8, **UNETS[kind]), seed, std=0.1)
    ours = UNetModel(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), strict=True)
    return ref, ours


def adapter_config(unet: UNetModel, projection: str) -> IPAdapterConfig:
    widths = [layer.to_k.out_features for layer in unet.cross_attention_layers()]
    if projection == "linear":
        return IPAdapterConfig("linear", EMBED, unet.config.context_dim, 4, widths)
    if projection == "mlp":
        return IPAdapterConfig("mlp", HIDDEN, unet.config.context_dim, 0, widths)
    # diffusers builds the resampler with its defaults (depth 4, 64-wide heads, feed-forward x4).
    return IPAdapterConfig("resampler", HIDDEN, unet.config.context_dim, 3, widths, resampler_dim=48,
                           resampler_depth=4, resampler_heads=2, resampler_dim_head=64, resampler_ff_mult=4)


def adapter(unet: UNetModel, projection: str, seed: int = 1) -> IPAdapter:
    return randomize(IPAdapter(adapter_config(unet, projection)), seed)


def released_dicts(sd: dict) -> dict:
    """A flat state dict -> the released nested form {"image_proj": {...}, "ip_adapter": {...}}."""
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out


def vision_encoder(seed: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
