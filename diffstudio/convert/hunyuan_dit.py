"""Hunyuan-DiT state dicts: diffusers ``HunyuanDiT2DModel`` <-> the released layout (ours).

The map is generated from the structure (depth, QK-norm, size/style conditioning), as a list of rules

    (our key, diffusers keys, kind)

with three kinds:

* ``same``  one tensor renamed;
* ``cat``   ours is the diffusers tensors stacked along dim 0: the fused self-attention projection
            ``attn1.Wqkv`` = [to_q; to_k; to_v] and the cross-attention ``attn2.kv_proj`` = [to_k; to_v]
            (the release computes q, k, v with one matmul and splits the output in this order);
* ``swap``  the final adaLN linear: the release chunks its output as (shift, scale), diffusers'
            AdaLayerNormContinuous as (scale, shift), so the two halves of the rows trade places.

Two block norms trade names: the release normalises with ``norm3`` before cross-attention and ``norm2``
before the MLP; diffusers calls them ``norm2`` and ``norm3``. Both directions end in ``check_conversion``
against the shapes of the model the config describes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.errors import ConversionError
from diffstudio.models.hunyuan_dit import HunyuanDiT, HunyuanDiTConfig

Rule = tuple[str, tuple[str, ...], str]


def _linear(ours: str, theirs: str | tuple[str, ...], kind: str = "same") -> list[Rule]:
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    return [(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), kind) for p in ("weight", "bias")]


def rules(depth: int, qk_norm: bool, size_style_cond: bool) -> list[Rule]:
    """Every (ours, diffusers, kind) rule of a Hunyuan-DiT of this structure."""
    te = "time_extra_emb."
    out: list[Rule] = [
        *_linear("x_embedder.proj", "pos_embed.proj"),
        *_linear("t_embedder.mlp.0", te + "timestep_embedder.linear_1"),
        *_linear("t_embedder.mlp.2", te + "timestep_embedder.linear_2"),
        *_linear("mlp_t5.0", "text_embedder.linear_1"),
        *_linear("mlp_t5.2", "text_embedder.linear_2"),
        ("text_embedding_padding", ("text_embedding_padding",), "same"),
        ("pooler.positional_embedding", (te + "pooler.positional_embedding",), "same"),
        *[r for p in ("q", "k", "v", "c") for r in _linear(f"pooler.{p}_proj", f"{te}pooler.{p}_proj")],
        *_linear("extra_embedder.0", te + "extra_embedder.linear_1"),
        *_linear("extra_embedder.2", te + "extra_embedder.linear_2"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    ]
    if size_style_cond:
        out.append(("style_embedder.weight", (te + "style_embedder.weight",), "same"))
    for i in range(depth):
        b = f"blocks.{i}."
        out += [
            *_linear(b + "norm1", b + "norm1.norm"),
            *_linear(b + "default_modulation.1", b + "norm1.linear"),
            *_linear(b + "attn1.Wqkv", tuple(f"{b}attn1.to_{x}" for x in "qkv"), "cat"),
            *_linear(b + "attn1.out_proj", b + "attn1.to_out.0"),
            *_linear(b + "attn2.q_proj", b + "attn2.to_q"),
            *_linear(b + "attn2.kv_proj", (b + "attn2.to_k", b + "attn2.to_v"), "cat"),
            *_linear(b + "attn2.out_proj", b + "attn2.to_out.0"),
            *_linear(b + "norm3", b + "norm2"),  # before cross-attention
            *_linear(b + "norm2", b + "norm3"),  # before the MLP
            *_linear(b + "mlp.fc1", b + "ff.net.0.proj"),
            *_linear(b + "mlp.fc2", b + "ff.net.2"),
        ]
        if qk_norm:
            for attn in ("attn1", "attn2"):
                out += _linear(f"{b}{attn}.q_norm", f"{b}{attn}.norm_q") + _linear(f"{b}{attn}.k_norm",
                                                                                   f"{b}{attn}.norm_k")
        if i > depth // 2:
            out += _linear(b + "skip_norm", b + "skip_norm") + _linear(b + "skip_linear", b + "skip_linear")
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _expected_shapes(config: HunyuanDiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HunyuanDiT(config).state_dict().items()}


def _diffusers_structure(sd: Mapping) -> tuple[int, bool, bool]:
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not depth:
        raise ConversionError("not a diffusers HunyuanDiT2DModel state dict: no 'blocks.N.*' keys")
    return depth, "blocks.0.attn1.norm_q.weight" in sd, "time_extra_emb.style_embedder.weight" in sd


def hunyuan_dit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``HunyuanDiT2DModel.state_dict()`` -> released layout (tensors are not copied unless fused)."""
    from diffstudio.detect.hunyuan_dit import derive_hunyuan_dit_config

    out: dict[str, torch.Tensor] = {}
    consumed: list[str] = []
    absent: list[str] = []
    for ours, theirs, kind in rules(*_diffusers_structure(sd)):
        if any(t not in sd for t in theirs):
            absent += [t for t in theirs if t not in sd]
            continue
        consumed += theirs
        if kind == "cat":
            out[ours] = torch.cat([sd[t] for t in theirs], dim=0)
        elif kind == "swap":
            out[ours] = _swap_halves(sd[theirs[0]])
        else:
            out[ours] = sd[theirs[0]]
    if absent:
        raise ConversionError(f"diffusers HunyuanDiT2DModel state dict lacks {len(absent)} key(s), e.g. "
                              f"{', '.join(absent[:6])} (truncated file?)")
    check_conversion("Hunyuan-DiT diffusers -> released layout", sd.keys(), consumed, out,
                     _expected_shapes(derive_hunyuan_dit_config(out)))
    return out


def hunyuan_dit_to_diffusers(sd: Mapping[str, torch.Tensor], config: HunyuanDiTConfig) -> dict[str, torch.Tensor]:
    """Released layout -> diffusers ``HunyuanDiT2DModel`` names. ``num_styles`` must be 1 (diffusers' table)."""
    check_conversion("Hunyuan-DiT released layout (input)", sd.keys(), sd.keys(), sd, _expected_shapes(config))
    if config.size_style_cond and config.num_styles != 1:
        raise ConversionError(f"this Hunyuan-DiT has {config.num_styles} style embeddings; diffusers' "
                              "HunyuanDiT2DModel holds exactly one")
    out: dict[str, torch.Tensor] = {}
    consumed: list[str] = []
    for ours, theirs, kind in rules(config.depth, config.qk_norm, config.size_style_cond):
        consumed.append(ours)
        tensor = sd[ours]
        if kind == "cat":
            if tensor.shape[0] % len(theirs):
                raise ConversionError(f"{ours}: {tensor.shape[0]} rows do not split into {len(theirs)} equal parts")
            out.update(zip(theirs, (t.clone() for t in tensor.chunk(len(theirs), dim=0))))  # no shared storage
        elif kind == "swap":
            out[theirs[0]] = _swap_halves(tensor)
        else:
            out[theirs[0]] = tensor
    check_conversion("Hunyuan-DiT released layout -> diffusers", sd.keys(), consumed, out)
    return out
