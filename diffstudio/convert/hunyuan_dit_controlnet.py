"""Hunyuan-DiT ControlNet state dicts: diffusers' ``HunyuanDiT2DControlNetModel`` <-> the release's ``.pt`` layout
(ours, models/hunyuan_dit_controlnet.py).

The embedders and blocks map as the DiT's do (``diffstudio.convert.hunyuan_dit``: fused qkv and kv, the swapped
norm2 / norm3, no long skips in these blocks); the ControlNet's own Linears are renamed as diffusers' conversion
script for Tencent's files renames them: ``before_proj`` <-> ``input_block``, ``after_proj_list.i`` <->
``controlnet_blocks.i``. Both directions end in the conversion check against our model on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.hunyuan_dit import block_rules, embedder_rules
from diffstudio.convert.rules import Rule, from_canonical, rule, to_canonical
from diffstudio.detect.hunyuan_dit_controlnet import derive_hunyuan_controlnet_config
from diffstudio.detect.vae import count_indices
from diffstudio.errors import ConversionError
from diffstudio.models.hunyuan_dit import HunyuanDiTConfig
from diffstudio.models.hunyuan_dit_controlnet import HunyuanDiTControlNet, controlnet_depth


def rules(blocks: int, qk_norm: bool, size_style_cond: bool) -> list[Rule]:
    """The rules of a Hunyuan-DiT ControlNet with ``blocks`` blocks (our module <-> diffusers module(s))."""
    out = embedder_rules(size_style_cond) + [rule("before_proj", "input_block")]
    for i in range(blocks):
        out += block_rules(i, qk_norm, skip=False) + [rule(f"after_proj_list.{i}", f"controlnet_blocks.{i}")]
    return out


def _meta_state_dict(config: HunyuanDiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return HunyuanDiTControlNet(config).state_dict()


def hunyuan_controlnet_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``HunyuanDiT2DControlNetModel.state_dict()`` -> the release's names."""
    blocks = count_indices(list(sd), "controlnet_blocks")
    if not blocks or "input_block.weight" not in sd:
        raise ConversionError("no controlnet_blocks.N / input_block keys: this is not a diffusers "
                              "HunyuanDiT2DControlNetModel state dict (is it already in the release's layout?)")
    structure = rules(blocks, "blocks.0.attn1.norm_q.weight" in sd, "time_extra_emb.style_embedder.weight" in sd)
    return to_canonical("Hunyuan-DiT ControlNet diffusers -> released layout", sd, structure,
                        lambda out: _meta_state_dict(derive_hunyuan_controlnet_config(out)))


def hunyuan_controlnet_to_diffusers(sd: Mapping[str, torch.Tensor],
                                    config: HunyuanDiTConfig) -> dict[str, torch.Tensor]:
    """The release's names -> diffusers ``HunyuanDiT2DControlNetModel``. ``num_styles`` must be 1 (diffusers' table;
    its conversion script keeps the first row of a release file's)."""
    if config.size_style_cond and config.num_styles != 1:
        raise ConversionError(f"this Hunyuan-DiT ControlNet has {config.num_styles} style embeddings; diffusers' "
                              "HunyuanDiT2DControlNetModel holds exactly one")
    return from_canonical("Hunyuan-DiT ControlNet released layout -> diffusers", sd,
                          rules(controlnet_depth(config), config.qk_norm, config.size_style_cond),
                          _meta_state_dict(config))
