"""MMDiT state dicts: diffusers' SD3Transformer2DModel layout <-> the original SD3 layout (canonical).

The map is generated from the structure (depth, which blocks have MMDiT-X's attn2, QK-norm),
block by block. Two tensor changes besides renaming:

* qkv: the original stores one fused ``attn.qkv`` Linear whose output rows are [q; k; v];
  diffusers has ``to_q`` / ``to_k`` / ``to_v`` (image stream) and ``add_{q,k,v}_proj`` (text
  stream). Weights and biases are split / concatenated along dim 0.
* adaLN chunk order: the original's final layer and the last block's pre-only context stream
  emit (shift, scale); diffusers' AdaLayerNormContinuous (``norm_out``, that block's
  ``norm1_context``) emits (scale, shift). Their Linear's output rows swap halves.

Every conversion ends in ``check_conversion`` against our model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.detect.mmdit import derive_mmdit_config
from diffstudio.detect.vae import count_indices
from diffstudio.errors import ConversionError
from diffstudio.models.mmdit import MMDiT, MMDiTConfig

SAME, QKV, SWAP = "same", "qkv", "swap"


def _linear(ours: str, theirs: str | tuple[str, ...], how: str = SAME) -> Iterator[tuple[str, tuple[str, ...], str]]:
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    for param in ("weight", "bias"):
        yield f"{ours}.{param}", tuple(f"{t}.{param}" for t in theirs), how


def _attention(ours: str, theirs: str, qkv: tuple[str, str, str], out: str | None,
               norms: tuple[str, str] | None) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """One stream's attention: fused qkv, optional output projection, optional per-head q/k RMSNorm."""
    yield from _linear(f"{ours}.qkv", tuple(f"{theirs}.{name}" for name in qkv), QKV)
    if out is not None:
        yield from _linear(f"{ours}.proj", f"{theirs}.{out}")
    if norms is not None:
        yield f"{ours}.ln_q.weight", (f"{theirs}.{norms[0]}.weight",), SAME
        yield f"{ours}.ln_k.weight", (f"{theirs}.{norms[1]}.weight",), SAME


def param_pairs(depth: int, dual_layers, qk_norm: bool, has_y: bool) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(canonical key, diffusers key(s), how) for every parameter of an MMDiT of this structure."""
    yield from _linear("x_embedder.proj", "pos_embed.proj")
    yield "pos_embed", ("pos_embed.pos_embed",), SAME
    yield from _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    yield from _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    if has_y:
        yield from _linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
        yield from _linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    yield from _linear("context_embedder", "context_embedder")
    for i in range(depth):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == depth - 1
        # image stream
        yield from _linear(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        yield from _attention(f"{o}.x_block.attn", f"{d}.attn", ("to_q", "to_k", "to_v"), "to_out.0",
                              ("norm_q", "norm_k") if qk_norm else None)
        if i in dual_layers:
            yield from _attention(f"{o}.x_block.attn2", f"{d}.attn2", ("to_q", "to_k", "to_v"), "to_out.0",
                                  ("norm_q", "norm_k") if qk_norm else None)
        yield from _linear(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        yield from _linear(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2")
        # text stream; the last block's is pre-only (AdaLayerNormContinuous in diffusers: swapped halves)
        yield from _linear(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear",
                           SWAP if pre_only else SAME)
        yield from _attention(f"{o}.context_block.attn", f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                              None if pre_only else "to_add_out",
                              ("norm_added_q", "norm_added_k") if qk_norm else None)
        if not pre_only:
            yield from _linear(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
            yield from _linear(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
    yield from _linear("final_layer.linear", "proj_out")
    yield from _linear("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP)


def _pairs_for(config: MMDiTConfig):
    return param_pairs(config.depth, set(config.dual_attention_layers), config.qk_norm is not None,
                       config.adm_in_channels is not None)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows of an adaLN Linear's weight (2C, C) or bias (2C,)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def meta_state_dict(config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our model's names and shapes (meta tensors, nothing allocated)."""
    with torch.device("meta"):
        return MMDiT(config).state_dict()


def mmdit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel state dict -> canonical (original SD3) state dict."""
    keys = list(sd)
    depth = count_indices(keys, "transformer_blocks")
    if depth == 0 or "pos_embed.proj.weight" not in sd:
        raise ConversionError("no diffusers transformer_blocks.N / pos_embed.proj keys: this is not a diffusers "
                              "SD3Transformer2DModel state dict (is it already in the original layout?)")
    dual = {i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd}
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    has_y = "time_text_embed.text_embedder.linear_1.weight" in sd
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for ours, theirs, how in param_pairs(depth, dual, qk_norm, has_y):
        if not all(k in sd for k in theirs):
            continue  # reported by the check below as a missing key
        tensors = [sd[k] for k in theirs]
        if how == QKV:
            out[ours] = torch.cat(tensors, dim=0)  # (3C, C): rows [q; k; v]
        elif how == SWAP:
            out[ours] = _swap_halves(tensors[0])  # (scale, shift) -> (shift, scale)
        else:
            out[ours] = tensors[0]
        consumed.update(theirs)
    # Without QK-norm the head count changes no name or shape, and one head always divides the width;
    # with it, ln_q's width is the head width and gives the count.
    expected = meta_state_dict(derive_mmdit_config(out, {} if qk_norm else {"num_heads": 1}))
    check_conversion("diffusers -> original MMDiT", sd.keys(), consumed, out, expected)
    return out


def _rename_to_diffusers(sd: Mapping, config: MMDiTConfig) -> tuple[dict, set]:
    out, consumed = {}, set()
    for ours, theirs, how in _pairs_for(config):
        if ours not in sd:
            continue
        tensor = sd[ours]
        if how == QKV:
            for name, part in zip(theirs, tensor.chunk(3, dim=0)):
                out[name] = part
        elif how == SWAP:
            out[theirs[0]] = _swap_halves(tensor)
        else:
            out[theirs[0]] = tensor
        consumed.add(ours)
    return out, consumed


def mmdit_to_diffusers(sd: Mapping[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Canonical (original SD3) state dict -> diffusers SD3Transformer2DModel state dict."""
    out, consumed = _rename_to_diffusers(sd, config)
    expected, _ = _rename_to_diffusers(meta_state_dict(config), config)
    check_conversion("original -> diffusers MMDiT", sd.keys(), consumed, out, expected)
    return out
