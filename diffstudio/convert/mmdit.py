"""MMDiT state dicts: diffusers' SD3Transformer2DModel layout <-> the original SD3 layout (canonical).

The map is a rule list (``diffstudio.convert.rules``) generated from the structure (depth, which blocks
have MMDiT-X's attn2, QK-norm), block by block. Two tensor changes besides renaming:

* ``Fuse``: the original stores one fused ``attn.qkv`` Linear whose output rows are [q; k; v];
  diffusers has ``to_q`` / ``to_k`` / ``to_v`` (image stream) and ``add_{q,k,v}_proj`` (text stream).
* ``SwapHalves``: the original's final layer and the last block's pre-only context stream emit
  (shift, scale); diffusers' AdaLayerNormContinuous (``norm_out``, that block's ``norm1_context``)
  emits (scale, shift).

Both directions end in ``check_conversion`` against our model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.rules import COPY, SWAP_HALVES, Fuse, Rule, from_canonical, rule, to_canonical
from diffstudio.detect.mmdit import derive_mmdit_config
from diffstudio.detect.vae import count_indices
from diffstudio.errors import ConversionError
from diffstudio.models.mmdit import MMDiT, MMDiTConfig


def attention_rules(ours: str, theirs: str, qkv: tuple[str, str, str], out: str | None,
               norms: tuple[str, str] | None) -> list[Rule]:
    """One stream's attention: fused qkv, optional output projection, optional per-head q/k RMSNorm."""
    found = [rule(f"{ours}.qkv", tuple(f"{theirs}.{name}" for name in qkv), Fuse())]
    if out is not None:
        found.append(rule(f"{ours}.proj", f"{theirs}.{out}"))
    if norms is not None:
        found += [rule(f"{ours}.ln_q", f"{theirs}.{norms[0]}"), rule(f"{ours}.ln_k", f"{theirs}.{norms[1]}")]
    return found


def embedder_rules(has_y: bool, patch_embed: bool = True, context: bool = True) -> list[Rule]:
    """Patch embedding and position table, timestep / pooled-text / text-token embedders."""
    te = "time_text_embed."
    out = [rule("x_embedder.proj", "pos_embed.proj"), rule("pos_embed", "pos_embed.pos_embed")] if patch_embed else []
    out += [rule("t_embedder.mlp.0", te + "timestep_embedder.linear_1"),
            rule("t_embedder.mlp.2", te + "timestep_embedder.linear_2")]
    if has_y:
        out += [rule("y_embedder.mlp.0", te + "text_embedder.linear_1"),
                rule("y_embedder.mlp.2", te + "text_embedder.linear_2")]
    if context:
        out.append(rule("context_embedder", "context_embedder"))
    return out


def joint_block_rules(o: str, d: str, pre_only: bool, dual: bool, qk_norm: bool) -> list[Rule]:
    """One joint block, ours at ``o`` (joint_blocks.i), diffusers' at ``d`` (transformer_blocks.i)."""
    image_norms = ("norm_q", "norm_k") if qk_norm else None
    # image stream
    out = [rule(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")]
    out += attention_rules(f"{o}.x_block.attn", f"{d}.attn", ("to_q", "to_k", "to_v"), "to_out.0", image_norms)
    if dual:
        out += attention_rules(f"{o}.x_block.attn2", f"{d}.attn2", ("to_q", "to_k", "to_v"), "to_out.0", image_norms)
    out += [rule(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj"), rule(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2")]
    # text stream; a pre-only one is AdaLayerNormContinuous in diffusers: swapped halves
    out.append(rule(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear",
                    SWAP_HALVES if pre_only else COPY))
    out += attention_rules(f"{o}.context_block.attn", f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                      None if pre_only else "to_add_out", ("norm_added_q", "norm_added_k") if qk_norm else None)
    if not pre_only:
        out += [rule(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                rule(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2")]
    return out


def rules(depth: int, dual_layers, qk_norm: bool, has_y: bool) -> list[Rule]:
    """The rules of an MMDiT of this structure (canonical module <-> diffusers module(s))."""
    out = embedder_rules(has_y)
    for i in range(depth):  # the last block's text stream is pre-only
        out += joint_block_rules(f"joint_blocks.{i}", f"transformer_blocks.{i}", i == depth - 1, i in dual_layers,
                                 qk_norm)
    return out + [rule("final_layer.linear", "proj_out"),
                  rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP_HALVES)]


def meta_state_dict(config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our model's names and shapes (meta tensors, nothing allocated)."""
    with torch.device("meta"):
        return MMDiT(config).state_dict()


def mmdit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel state dict -> canonical (original SD3) state dict."""
    depth = count_indices(sd, "transformer_blocks")
    if depth == 0 or "pos_embed.proj.weight" not in sd:
        raise ConversionError("no diffusers transformer_blocks.N / pos_embed.proj keys: this is not a diffusers "
                              "SD3Transformer2DModel state dict (is it already in the original layout?)")
    dual = {i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd}
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    has_y = "time_text_embed.text_embedder.linear_1.weight" in sd
    # Without QK-norm the head count changes no name or shape, and one head always divides the width;
    # with it, ln_q's width is the head width and gives the count.
    return to_canonical("diffusers -> original MMDiT", sd, rules(depth, dual, qk_norm, has_y),
                        lambda out: meta_state_dict(derive_mmdit_config(out, {} if qk_norm else {"num_heads": 1})))


def mmdit_to_diffusers(sd: Mapping[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Canonical (original SD3) state dict -> diffusers SD3Transformer2DModel state dict."""
    structure = rules(config.depth, set(config.dual_attention_layers), config.qk_norm is not None,
                      config.adm_in_channels is not None)
    return from_canonical("original -> diffusers MMDiT", sd, structure, meta_state_dict(config))
