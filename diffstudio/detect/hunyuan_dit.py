"""Hunyuan-DiT: derive a ``HunyuanDiTConfig`` from key names and tensor shapes (released layout).

What shapes reveal (canonical = released names, see diffstudio/models/hunyuan_dit.py):
    hidden_size, in_channels, patch   ``x_embedder.proj.weight``               (D, C, p, p)
    depth                             count of ``blocks.N``; must be even
    num_heads                         D / width of ``blocks.0.attn1.q_norm.weight`` (the per-head norm)
    mlp_hidden                        rows of ``blocks.0.mlp.fc1.weight``
    learn_sigma                       rows of ``final_layer.linear.weight`` = p*p*2C (else p*p*C)
    text_dim / text_dim_t5            ``mlp_t5.2.weight`` (1024, 8192) / ``mlp_t5.0.weight`` (8192, 2048)
    text_len_t5                       rows of ``pooler.positional_embedding`` - 1 (257 -> 256)
    text_len                          rows of ``text_embedding_padding`` - text_len_t5 (333 -> 77)
    pooler_dim                        rows of ``pooler.c_proj.weight``
    size_style_cond (v1.0/1.1)        ``style_embedder.weight`` present; checked against the width of
                                      ``extra_embedder.0.weight`` (1024 + 6*256 + D, or 1024 for v1.2)

What they cannot, and where it comes from: ``pooler_heads`` (8 in every release; hint
``pooler_heads``), ``num_heads`` of a model without QK-norm (hint ``num_heads``; every release has
QK-norm), the RoPE base (the 512-px base: 64 / patch tokens).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

from diffstudio.errors import UnknownModelError
from diffstudio.models.hunyuan_dit import HunyuanDiTConfig

HUNYUAN_DIT_SENTINELS: tuple[str, ...] = (
    "x_embedder.proj.weight",
    "mlp_t5.0.weight",
    "text_embedding_padding",
    "pooler.positional_embedding",
    "blocks.0.attn1.Wqkv.weight",
    "blocks.0.attn2.kv_proj.weight",
    "final_layer.linear.weight",
)
HUNYUAN_DIT_DIFFUSERS_SENTINELS: tuple[str, ...] = (
    "pos_embed.proj.weight",
    "text_embedder.linear_1.weight",
    "text_embedding_padding",
    "time_extra_emb.pooler.positional_embedding",
    "blocks.0.attn1.to_q.weight",
    "proj_out.weight",
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
HINTABLE = frozenset({"num_heads", "pooler_heads"})


def count_blocks(keys, pattern: re.Pattern = _BLOCK) -> int:
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not indices:
        raise UnknownModelError("Hunyuan-DiT state dict has no 'blocks.N.*' keys (truncated file?)")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise UnknownModelError(f"Hunyuan-DiT blocks are not contiguous: blocks {missing} are missing")
    return len(indices)


def derive_hunyuan_dit_config(sd: Mapping, hints: Mapping | None = None) -> HunyuanDiTConfig:
    """Canonical Hunyuan-DiT state dict (names + shapes) -> HunyuanDiTConfig. See the module docstring."""
    missing = [k for k in HUNYUAN_DIT_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a Hunyuan-DiT state dict in the released layout: missing {missing}. "
                                "A diffusers HunyuanDiT2DModel goes through "
                                "diffstudio.convert.hunyuan_dit.hunyuan_dit_from_diffusers first.")
    depth = count_blocks(sd.keys())
    if depth % 2:
        raise UnknownModelError(f"Hunyuan-DiT with {depth} blocks: the long skips need an even count")
    hidden, in_channels, patch, _ = _shape(sd, "x_embedder.proj.weight")
    out = _shape(sd, "final_layer.linear.weight")[0] // (patch * patch)
    if out not in (in_channels, 2 * in_channels):
        raise UnknownModelError(f"Hunyuan-DiT final layer gives {out} channels per pixel for {in_channels} "
                                "input channels (expected the same, or twice with learn_sigma)")
    return config_from_shapes(sd, hints, depth, learn_sigma=out == 2 * in_channels)


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnknownModelError(f"Hunyuan-DiT state dict lacks '{key}' (truncated or pruned file?)")
    return tuple(int(d) for d in sd[key].shape)


def config_from_shapes(sd: Mapping, hints: Mapping | None, depth: int, learn_sigma: bool) -> HunyuanDiTConfig:
    """The fields the DiT and its ControlNet share, from the embedders and block 0 (the module docstring's
    table); ``depth`` and ``learn_sigma`` are the caller's."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"Hunyuan-DiT config: hints {sorted(unknown)} are not allowed (shapes decide "
                         f"them); allowed: {sorted(HINTABLE)}")
    shape = partial(_shape, sd)
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    qk_norm = "blocks.0.attn1.q_norm.weight" in sd
    if qk_norm:
        head_dim = shape("blocks.0.attn1.q_norm.weight")[0]
        num_heads = hidden // head_dim
    elif "num_heads" in hints:
        num_heads = int(hints["num_heads"])
    else:
        raise UnknownModelError("this Hunyuan-DiT has no QK-norm, so its head count cannot be read from shapes; "
                                "pass hints={'num_heads': N}")
    mlp_hidden = shape("blocks.0.mlp.fc1.weight")[0]
    text_dim = shape("mlp_t5.2.weight")[0]
    text_dim_t5 = shape("mlp_t5.0.weight")[1]
    text_len_t5 = shape("pooler.positional_embedding")[0] - 1
    text_len = shape("text_embedding_padding")[0] - text_len_t5
    size_style = "style_embedder.weight" in sd
    config = HunyuanDiTConfig(
        in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=num_heads,
        mlp_hidden=mlp_hidden, learn_sigma=learn_sigma, text_dim=text_dim, text_dim_t5=text_dim_t5,
        text_len=text_len, text_len_t5=text_len_t5, pooler_heads=int(hints.get("pooler_heads", 8)),
        pooler_dim=shape("pooler.c_proj.weight")[0], size_style_cond=size_style,
        num_styles=shape("style_embedder.weight")[0] if size_style else 1, qk_norm=qk_norm,
        rope_base_size=64 // patch)
    extra_in = shape("extra_embedder.0.weight")[1]
    if extra_in != config.extra_in_dim:
        raise UnknownModelError(f"Hunyuan-DiT extra_embedder takes width {extra_in}, but the pooled text "
                                f"{'+ size + style ' if size_style else ''}gives {config.extra_in_dim}: an unknown "
                                "variant (v1.0/1.1 embed size and style, v1.2 neither)")
    return config


def config_from_diffusers(config_json: Mapping) -> HunyuanDiTConfig:
    """A diffusers ``HunyuanDiT2DModel`` config.json -> HunyuanDiTConfig."""
    cfg = dict(config_json)
    heads = int(cfg.get("num_attention_heads", 16))
    inner = heads * int(cfg.get("attention_head_dim", 88))
    hidden = int(cfg.get("hidden_size", 1152))
    if inner != hidden:
        raise UnknownModelError(f"diffusers HunyuanDiT2DModel config: attention width {inner} != hidden_size "
                                f"{hidden}; no released Hunyuan-DiT has that")
    patch = int(cfg.get("patch_size") or 2)
    return HunyuanDiTConfig(
        in_channels=int(cfg.get("in_channels") or 4), patch_size=patch, hidden_size=hidden,
        depth=int(cfg.get("num_layers", 28)), num_heads=heads, mlp_hidden=int(inner * float(cfg.get("mlp_ratio", 4.0))),
        learn_sigma=bool(cfg.get("learn_sigma", True)), text_dim=int(cfg.get("cross_attention_dim", 1024)),
        text_dim_t5=int(cfg.get("cross_attention_dim_t5", 2048)), text_len=int(cfg.get("text_len", 77)),
        text_len_t5=int(cfg.get("text_len_t5", 256)), pooler_dim=int(cfg.get("pooled_projection_dim", 1024)),
        size_style_cond=bool(cfg.get("use_style_cond_and_image_meta_size", True)), rope_base_size=64 // patch)


def variant(config: HunyuanDiTConfig) -> str:
    """Which release a config is: "v1.2" (no size/style conditioning) or "v1.0/v1.1" (with). The distilled
    v1.2 (``pytorch_model_distill.pt``) has the same structure and only its file name tells it apart."""
    return "v1.0/v1.1" if config.size_style_cond else "v1.2"
