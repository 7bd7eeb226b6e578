"""Hunyuan-DiT state dicts: diffusers ``HunyuanDiT2DModel`` <-> the released layout (ours).

The map is a rule list (``diffstudio.convert.rules``) generated from the structure (depth, QK-norm,
size/style conditioning). Two tensor changes besides renaming:

* ``Fuse``: ours is the diffusers tensors stacked along dim 0: the fused self-attention projection
  ``attn1.Wqkv`` = [to_q; to_k; to_v] and the cross-attention ``attn2.kv_proj`` = [to_k; to_v]
  (the release computes q, k, v with one matmul and splits the output in this order);
* ``SwapHalves``: the final adaLN linear: the release chunks its output as (shift, scale), diffusers'
  AdaLayerNormContinuous as (scale, shift).

Two block norms trade names: the release normalises with ``norm3`` before cross-attention and ``norm2``
before the MLP; diffusers calls them ``norm2`` and ``norm3``. Both directions end in ``check_conversion``
against the model the config describes, built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.rules import SWAP_HALVES, Fuse, Rule, from_canonical, rule, same, to_canonical
from diffstudio.detect.hunyuan_dit import derive_hunyuan_dit_config
from diffstudio.errors import ConversionError
from diffstudio.models.hunyuan_dit import HunyuanDiT, HunyuanDiTConfig


def embedder_rules(size_style_cond: bool) -> list[Rule]:
    """The text refiner, padding, pooler and embedders (shared with the ControlNet)."""
    te = "time_extra_emb."
    out = [
        rule("x_embedder.proj", "pos_embed.proj"),
        rule("t_embedder.mlp.0", te + "timestep_embedder.linear_1"),
        rule("t_embedder.mlp.2", te + "timestep_embedder.linear_2"),
        rule("mlp_t5.0", "text_embedder.linear_1"),
        rule("mlp_t5.2", "text_embedder.linear_2"),
        *same("text_embedding_padding"),
        rule("pooler", te + "pooler"),  # positional_embedding and the q, k, v, c projections keep their names
        rule("extra_embedder.0", te + "extra_embedder.linear_1"),
        rule("extra_embedder.2", te + "extra_embedder.linear_2"),
    ]
    if size_style_cond:
        out.append(rule("style_embedder", te + "style_embedder"))
    return out


def block_rules(i: int, qk_norm: bool, skip: bool) -> list[Rule]:
    """Block i (shared with the ControlNet, whose blocks take no skip)."""
    b = f"blocks.{i}."
    out = [
        rule(b + "norm1", b + "norm1.norm"),
        rule(b + "default_modulation.1", b + "norm1.linear"),
        rule(b + "attn1.Wqkv", tuple(f"{b}attn1.to_{x}" for x in "qkv"), Fuse()),
        rule(b + "attn1.out_proj", b + "attn1.to_out.0"),
        rule(b + "attn2.q_proj", b + "attn2.to_q"),
        rule(b + "attn2.kv_proj", (b + "attn2.to_k", b + "attn2.to_v"), Fuse()),
        rule(b + "attn2.out_proj", b + "attn2.to_out.0"),
        rule(b + "norm3", b + "norm2"),  # before cross-attention
        rule(b + "norm2", b + "norm3"),  # before the MLP
        rule(b + "mlp.fc1", b + "ff.net.0.proj"),
        rule(b + "mlp.fc2", b + "ff.net.2"),
    ]
    if qk_norm:
        out += [rule(f"{b}{attn}.{x}_norm", f"{b}{attn}.norm_{x}") for attn in ("attn1", "attn2") for x in "qk"]
    if skip:  # the second half's long skips from the first half
        out += same(b + "skip_norm", b + "skip_linear")
    return out


def rules(depth: int, qk_norm: bool, size_style_cond: bool) -> list[Rule]:
    """The rules of a Hunyuan-DiT of this structure (our module <-> diffusers module(s))."""
    out = embedder_rules(size_style_cond) + [
        rule("final_layer.linear", "proj_out"),
        rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP_HALVES),
    ]
    for i in range(depth):
        out += block_rules(i, qk_norm, i > depth // 2)
    return out


def _meta_state_dict(config: HunyuanDiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return HunyuanDiT(config).state_dict()


def _diffusers_structure(sd: Mapping) -> tuple[int, bool, bool]:
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not depth:
        raise ConversionError("not a diffusers HunyuanDiT2DModel state dict: no 'blocks.N.*' keys")
    return depth, "blocks.0.attn1.norm_q.weight" in sd, "time_extra_emb.style_embedder.weight" in sd


def hunyuan_dit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``HunyuanDiT2DModel.state_dict()`` -> released layout (tensors are not copied unless fused)."""
    return to_canonical("Hunyuan-DiT diffusers -> released layout", sd, rules(*_diffusers_structure(sd)),
                        lambda out: _meta_state_dict(derive_hunyuan_dit_config(out)))


def hunyuan_dit_to_diffusers(sd: Mapping[str, torch.Tensor], config: HunyuanDiTConfig) -> dict[str, torch.Tensor]:
    """Released layout -> diffusers ``HunyuanDiT2DModel`` names. ``num_styles`` must be 1 (diffusers' table)."""
    if config.size_style_cond and config.num_styles != 1:
        raise ConversionError(f"this Hunyuan-DiT has {config.num_styles} style embeddings; diffusers' "
                              "HunyuanDiT2DModel holds exactly one")
    return from_canonical("Hunyuan-DiT released layout -> diffusers", sd,
                          rules(config.depth, config.qk_norm, config.size_style_cond), _meta_state_dict(config))
