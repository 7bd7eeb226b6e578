"""Recognise a Hunyuan-DiT ControlNet and derive its config (the base DiT's ``HunyuanDiTConfig``).

Canonical names are the release's ``.pt`` names (models/hunyuan_dit_controlnet.py). What shapes reveal is what
they reveal for the DiT (``detect.hunyuan_dit.config_from_shapes``: width, heads from the QK-norm, MLP width,
text widths and lengths, v1.0/1.1's size and style conditioning), plus

    base depth      2 * (count of ``blocks.N`` + 1): the ControlNet copies the depth/2 - 1 blocks that feed the
                    long skips (19 -> the released 40); ``after_proj_list.N`` must count the same

A diffusers ``HunyuanDiT2DControlNetModel`` config.json gives ``transformer_num_layers`` (the base's depth).
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.detect.hunyuan_dit import config_from_diffusers, config_from_shapes, count_blocks
from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError
from diffstudio.models.hunyuan_dit import HunyuanDiTConfig

HUNYUAN_CONTROLNET_SENTINELS = (
    "before_proj.weight",
    "after_proj_list.0.weight",
    "x_embedder.proj.weight",
    "mlp_t5.0.weight",
    "pooler.positional_embedding",
    "blocks.0.attn1.Wqkv.weight",
)
HUNYUAN_CONTROLNET_DIFFUSERS_SENTINELS = (
    "input_block.weight",
    "controlnet_blocks.0.weight",
    "pos_embed.proj.weight",
    "text_embedder.linear_1.weight",
    "time_extra_emb.pooler.positional_embedding",
    "blocks.0.attn1.to_q.weight",
)


def derive_hunyuan_controlnet_config(sd: Mapping, hints: Mapping | None = None) -> HunyuanDiTConfig:
    """Canonical Hunyuan-DiT ControlNet state dict (names + shapes) -> the base DiT's HunyuanDiTConfig."""
    missing = [k for k in HUNYUAN_CONTROLNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a Hunyuan-DiT ControlNet state dict in the released layout: missing {missing}; "
                                "a diffusers HunyuanDiT2DControlNetModel goes through "
                                "diffstudio.convert.hunyuan_dit_controlnet first")
    blocks = count_blocks(sd.keys())
    outs = count_indices(list(sd), "after_proj_list")
    if outs != blocks:
        raise UnknownModelError(f"Hunyuan-DiT ControlNet with {blocks} blocks and {outs} after_proj_list Linears: it "
                                "needs one per block (truncated file?)")
    return config_from_shapes(sd, hints, depth=2 * (blocks + 1), learn_sigma=True)


def hunyuan_controlnet_config_from_diffusers(config_json: Mapping) -> HunyuanDiTConfig:
    """A diffusers ``HunyuanDiT2DControlNetModel`` config.json -> the base's HunyuanDiTConfig (its defaults for
    absent fields; ``conditioning_channels`` is read by no layer of that class and is ignored)."""
    cfg = dict(config_json)
    return config_from_diffusers({**cfg, "num_layers": int(cfg.get("transformer_num_layers", 40)),
                                  "learn_sigma": True})
