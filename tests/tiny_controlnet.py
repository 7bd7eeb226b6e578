"""Tiny ControlNets built with diffusers (random weights, never zeros) and their UNets.

Two kinds, each a UNet config and the ControlNet config of its encoder:
  * "sd15": conv proj_in, a fixed head count, attention on all but the last level, a narrow hint encoder;
  * "sdxl": linear proj, no attention at level 0, per-level depths, 16-wide heads, a ``text_time`` vector
    input (pooled text ++ Fourier embeddings of 6 size/crop ids), the released hint widths.
"""

from __future__ import annotations

import torch

from diffstudio.models.layers import timestep_embedding
from tests.test_unet import POOLED, TIME_DIM, TINY  # noqa: F401 (TIME_DIM, POOLED: part of this fixture's face)
from tests.tiny_sd15 import randomise

UNETS = {"sd15": TINY["sd1"], "sdxl": TINY["sdxl"]}  # the UNet tests' tiny layouts
HINT_WIDTHS = {"sd15": (8, 16, 16, 32), "sdxl": (16, 32, 96, 256)}
# What shapes cannot reveal, as a base UNet's config would give it.
HINTS = {"sd15": {"num_heads": 2, "norm_groups": 8}, "sdxl": {"num_head_channels": 16, "norm_groups": 8}}


def controlnet_config(kind: str) -> dict:
    """The diffusers ControlNetModel config of the encoder of UNETS[kind]."""
    cfg = {k: v for k, v in UNETS[kind].items() if k != "up_block_types"}
    return {**cfg, "conditioning_embedding_out_channels": HINT_WIDTHS[kind]}


def reference_controlnet(kind: str, seed: int = 0, **overrides):
    from diffusers import ControlNetModel

    model = ControlNetModel(**{**controlnet_config(kind), **overrides})
    randomise(model, seed)
    # Gain ~1 through the hint encoder's eight convs (randomise's 0.5 would leave the control image a 1e-3
    # part of its output, biases being the rest): the control image then visibly drives the residuals.
    with torch.no_grad():
        for name, p in model.controlnet_cond_embedding.named_parameters():
            p.mul_(3.0 if name.endswith("weight") else 0.1)
    return model.eval()


def reference_unet(kind: str, seed: int = 1):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, **UNETS[kind])
    randomise(model, seed)
    return model.eval()


def inputs(kind: str, size: tuple[int, int] = (8, 8), batch: int = 2, seed: int = 2):
    """(x, hint, t, context), diffusers' extra kwargs, our extra kwargs (SDXL: the same vector both ways)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    # A control image with structure at the latent's scale (pixel noise would average out in the hint encoder).
    hint = torch.nn.functional.interpolate(torch.rand(batch, 3, *size, generator=g), scale_factor=8, mode="bilinear")
    t = torch.tensor([10.5, 700.0][:batch])
    context = torch.randn(batch, 7, UNETS[kind]["cross_attention_dim"], generator=g)
    if kind != "sdxl":
        return (x, hint, t, context), {}, {}
    pooled = torch.randn(batch, POOLED, generator=g)
    time_ids = torch.tensor([[512.0, 768, 0, 16, 512, 768]] * batch)
    # SDXL's vector: pooled text embedding ++ the sinusoidal embedding of each of the 6 size/crop ids.
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(batch, -1)], dim=-1)
    return (x, hint, t, context), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}, {"y": y}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
