"""Recognise an MMDiT (SD3 / SD3.5) and derive its `MMDiTConfig` from key names and tensor shapes.

What shapes reveal (canonical = original SD3 release names):
    hidden_size, in_channels, patch   x_embedder.proj.weight            (C, C_in, p, p)
    pos_embed_max_size                pos_embed                         (1, S*S, C)
    depth                             count of joint_blocks.N
    out_channels                      final_layer.linear.weight         (p*p*C_out, C)
    context_in_dim                    context_embedder.weight           (C, D_text)
    adm_in_channels                   y_embedder.mlp.0.weight           (C, D_pooled), when present
    mlp_hidden_size                   joint_blocks.0.x_block.mlp.fc1    (4C, C)
    qk_norm                           attn.ln_q.weight present          (head_dim,)
    dual_attention_layers             blocks N with x_block.attn2.*
    frequency_embedding_size          t_embedder.mlp.0.weight           (C, 256)

The number of heads is not in any shape unless the model has QK-norm (ln_q's width is the head
width). Otherwise it comes from ``hints["num_heads"]`` or the SD3 convention: heads of width 64
(SD3-medium: 1536 / 64 = 24 heads, SD3.5-large: 2432 / 64 = 38).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError
from diffstudio.models.mmdit import MMDiTConfig

MMDIT_SENTINELS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "context_embedder.weight",
    "joint_blocks.0.context_block.attn.qkv.weight",
    "joint_blocks.0.x_block.attn.qkv.weight",
    "final_layer.linear.weight",
)

# diffusers' SD3Transformer2DModel. `pos_embed.proj` tells it from FLUX's transformer, whose blocks
# carry the same attention names.
MMDIT_DIFFUSERS_SENTINELS = (
    "pos_embed.proj.weight",
    "context_embedder.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "proj_out.weight",
)

HEAD_WIDTH = 64
HINTABLE = frozenset({"num_heads"})


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in sd[key].shape)


def derive_mmdit_config(sd: Mapping, hints: Mapping | None = None) -> MMDiTConfig:
    """Canonical MMDiT state dict (names + shapes; meta tensors work) -> MMDiTConfig."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_mmdit_config: hints {sorted(unknown)} are not allowed; shapes decide those "
                         f"(allowed: {sorted(HINTABLE)})")
    missing = [k for k in MMDIT_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an SD3 MMDiT state dict: missing {missing}. Strip the "
                                "'model.diffusion_model.' prefix first; a diffusers SD3Transformer2DModel goes "
                                "through diffstudio.convert.mmdit.mmdit_from_diffusers.")
    hidden, in_channels, patch, patch_w = _shape(sd, "x_embedder.proj.weight")
    if patch != patch_w:
        raise UnknownModelError(f"x_embedder.proj has a {patch}x{patch_w} kernel; MMDiT patches are square")
    positions = _shape(sd, "pos_embed")[-2]
    size = math.isqrt(positions)
    if size * size != positions:
        raise UnknownModelError(f"pos_embed holds {positions} positions, not a square grid")
    depth = count_indices(list(sd), "joint_blocks")
    final_out, _ = _shape(sd, "final_layer.linear.weight")
    emb_out, context_in = _shape(sd, "context_embedder.weight")
    if emb_out != hidden:
        raise UnknownModelError(f"context_embedder gives width {emb_out} but the image tokens have {hidden}; "
                                "diffstudio's MMDiT needs them equal (as in every SD3 release)")
    for i in range(depth):  # only the last block's context stream is "pre_only" (no output projection)
        has_proj = f"joint_blocks.{i}.context_block.attn.proj.weight" in sd
        if has_proj == (i == depth - 1):
            raise UnknownModelError(f"joint block {i} {'has' if has_proj else 'lacks'} a context output "
                                    f"projection; in an SD3 MMDiT only the last block ({depth - 1}) lacks one. "
                                    "The file is truncated or not an SD3 model.")
    qk_key = "joint_blocks.0.x_block.attn.ln_q"
    if f"{qk_key}.bias" in sd:
        raise UnknownModelError("this MMDiT normalises q/k with LayerNorm (ln_q.bias); diffstudio knows the "
                                "RMSNorm of SD3.5 only")
    qk_norm = "rms" if f"{qk_key}.weight" in sd else None
    heads = hints.get("num_heads")
    if heads is None:
        if qk_norm:
            heads = hidden // _shape(sd, f"{qk_key}.weight")[0]
        elif hidden % HEAD_WIDTH == 0:
            heads = hidden // HEAD_WIDTH
        else:
            raise UnknownModelError(f"MMDiT width {hidden} is not a multiple of the SD3 head width {HEAD_WIDTH}, "
                                    "so the number of heads cannot be derived: pass hints={'num_heads': N} "
                                    "(a config stored with the weights carries it)")
    adm_key = "y_embedder.mlp.0.weight"
    return MMDiTConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=int(heads),
        patch_size=patch,
        in_channels=in_channels,
        out_channels=final_out // (patch * patch),
        pos_embed_max_size=size,
        context_in_dim=context_in,
        adm_in_channels=_shape(sd, adm_key)[1] if adm_key in sd else None,
        mlp_hidden_size=_shape(sd, "joint_blocks.0.x_block.mlp.fc1.weight")[0],
        qk_norm=qk_norm,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
        frequency_embedding_size=_shape(sd, "t_embedder.mlp.0.weight")[1],
    )


def config_from_diffusers(config_json: Mapping) -> MMDiTConfig:
    """A diffusers `SD3Transformer2DModel` config.json dict -> MMDiTConfig."""
    cfg = dict(config_json)
    heads, head_dim = int(cfg.get("num_attention_heads", 18)), int(cfg.get("attention_head_dim", 64))
    hidden = heads * head_dim
    if int(cfg.get("caption_projection_dim", hidden)) != hidden:
        raise UnknownModelError(f"caption_projection_dim {cfg['caption_projection_dim']} differs from the "
                                f"transformer width {hidden}; no SD3 release does that and diffstudio's MMDiT "
                                "does not support it")
    qk = cfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise UnknownModelError(f"SD3 transformer with qk_norm={qk!r}: diffstudio supports None and 'rms_norm'")
    in_channels = int(cfg.get("in_channels", 16))
    return MMDiTConfig(
        depth=int(cfg.get("num_layers", 18)),
        hidden_size=hidden,
        num_heads=heads,
        patch_size=int(cfg.get("patch_size", 2)),
        in_channels=in_channels,
        out_channels=int(cfg.get("out_channels") or in_channels),
        pos_embed_max_size=int(cfg.get("pos_embed_max_size", 96)),
        context_in_dim=int(cfg.get("joint_attention_dim", 4096)),
        adm_in_channels=int(cfg.get("pooled_projection_dim", 2048)),
        mlp_hidden_size=4 * hidden,  # diffusers' FeedForward: mult 4
        qk_norm="rms" if qk else None,
        dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
    )
