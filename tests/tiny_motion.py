"""Tiny AnimateDiff set-ups built with diffusers (random weights, never zeros): a UNet2DConditionModel,
a MotionAdapter for it, diffusers' UNetMotionModel of the two, and ours converted from them."""

from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from tiny_sd15 import randomise

from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect.unet import derive_unet_config
from diffstudio.models.motion import MotionModules
from diffstudio.models.unet import UNetModel
from diffstudio.motion_loading import motion_state_dict

TIME_DIM = 8
POOLED = 16
# (UNet2DConditionModel kwargs, our UNet hints, MotionAdapter kwargs)
SETUPS = {
    # SD 1.5-like: attention on level 0 only, 2 levels, v2-style middle module.
    "sd15_v2": (dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=8),
                {"num_heads": 2, "norm_groups": 8},
                dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                     motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=True)),
    # SD 1.5-like with 2 ResBlocks per level and no middle module (v1/v3 layout).
    "sd15_v3": (dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=8),
                {"num_heads": 2, "norm_groups": 8},
                dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=4,
                     motion_norm_num_groups=8, motion_max_seq_length=6, use_motion_mid_block=False)),
    # SDXL-like: no attention at level 0, linear projections, 3 levels, the text_time vector.
    "sdxl": (dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8,
                  addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                  projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM),
             {"num_head_channels": 16, "norm_groups": 8},
             dict(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                  motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)),
}


def reference(name: str, seed: int = 0):
    """(UNet2DConditionModel, MotionAdapter, UNetMotionModel) with seeded random weights, eval mode."""
    unet_kwargs, _, adapter_kwargs = SETUPS[name]
    unet = UNet2DConditionModel(**unet_kwargs)
    adapter = MotionAdapter(**adapter_kwargs)
    randomise(unet, seed)
    randomise(adapter, seed + 1)
    motion_unet = UNetMotionModel.from_unet2d(unet, adapter).eval()
    # from_unet2d (diffusers 0.42) leaves SDXL's vector embedding (add_embedding) at random weights.
    if getattr(unet, "add_embedding", None) is not None:
        motion_unet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    return unet.eval(), adapter.eval(), motion_unet


def ours(name: str, unet, adapter, norm_across_frames: bool) -> tuple[UNetModel, MotionModules]:
    """Our UNet and motion modules, converted from the reference's state dicts."""
    _, unet_hints, adapter_kwargs = SETUPS[name]
    sd = unet_from_diffusers(unet.state_dict())
    model = UNetModel(derive_unet_config(sd, unet_hints))
    model.load_state_dict(sd)
    motion_sd, config = motion_state_dict(adapter.state_dict(), hints={
        "num_heads": adapter_kwargs["motion_num_attention_heads"],
        "norm_groups": adapter_kwargs["motion_norm_num_groups"], "norm_across_frames": norm_across_frames})
    motion = MotionModules(config)
    motion.load_state_dict(motion_sd)
    return model.eval(), motion.eval()


def inputs(name: str, batch: int, frames: int, seed: int = 0) -> dict:
    """Reference inputs: sample (B, C, F, H, W), per-video timesteps, per-frame text, SDXL vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {"sample": torch.randn(batch, 4, frames, 8, 8, generator=g),
           "timestep": torch.tensor([300.0, 700.0, 20.0][:batch]),
           "context": torch.randn(batch * frames, 5, 24, generator=g)}
    if name == "sdxl":
        out["text_embeds"] = torch.randn(batch, POOLED, generator=g)
        out["time_ids"] = torch.rand(batch, 6, generator=g) * 1024
    return out


def add_time_y(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's vector condition as our UNet takes it: pooled text + sinusoidal embeddings of the 6 ids."""
    from diffstudio.models.layers import timestep_embedding

    emb = timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(time_ids.shape[0], -1)
    return torch.cat([text_embeds, emb], dim=-1)


def run_reference(motion_unet, name: str, data: dict) -> torch.Tensor:
    """diffusers' output, as (B*F, C, H, W) with frames consecutive per video."""
    kwargs = {}
    if name == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": data["text_embeds"], "time_ids": data["time_ids"]}
    with torch.no_grad():
        out = motion_unet(data["sample"], data["timestep"], data["context"], **kwargs).sample
    b, c, f, h, w = out.shape
    return out.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def run_ours(model: UNetModel, name: str, data: dict, **hook) -> torch.Tensor:
    b, c, f, h, w = data["sample"].shape
    x = data["sample"].permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    y = None
    if name == "sdxl":
        y = add_time_y(data["text_embeds"], data["time_ids"]).repeat_interleave(f, 0)
    with torch.no_grad():
        return model(x, data["timestep"].repeat_interleave(f), data["context"], y=y, **hook)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
