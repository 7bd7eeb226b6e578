"""Recognise an SD3 / SD3.5 ControlNet and derive its `SD3ControlNetConfig` from key names and shapes.

What shapes reveal (canonical names, models/sd3_controlnet.py):
    hidden_size                     controlnet_blocks.0.weight            (C, C)
    depth                           count of joint_blocks.N / transformer_blocks.N (= count of controlnet_blocks)
    hint_channels, patch_size       pos_embed_input.proj.weight            (C, C_hint, p, p)
    in_channels                     x_embedder.proj.weight                 (C, C_in, p, p), when it has its own
    pos_embed_max_size              pos_embed                              (1, S*S, C), when it has its own
    context_in_dim                  context_embedder.weight                (C, D_text): joint blocks; absent: single
    adm_in_channels                 y_embedder.mlp.0.weight                (C, D_pooled)
    mlp_hidden_size                 the first block's mlp.fc1.weight       (4C, C)
    qk_norm, dual_attention_layers  attn.ln_q / x_block.attn2 present, as for the MMDiT

Heads come from ln_q's width when there is QK-norm, else from ``hints["num_heads"]`` (the base MMDiT's when a
ControlNet is added to a model) or SD3's 64-wide heads. Whether it was trained on a zero pooled vector
(``zero_pooled``) is in no shape: diffusers' config.json says it (``force_zeros_for_pooled_projection``); without
one, the released convention: joint-block ControlNets (InstantX) yes, single-stream ones (SD3.5) no.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from diffstudio.detect.mmdit import HEAD_WIDTH
from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError
from diffstudio.models.sd3_controlnet import SD3ControlNetConfig

# Both kinds, canonical names. `pos_embed_input` (the control latent's patch embedding) is what no other
# ControlNet has (FLUX's embed their control input with `controlnet_x_embedder`).
SD3_CONTROLNET_SENTINELS = (
    "pos_embed_input.proj.weight",
    "controlnet_blocks.0.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.mlp.0.weight",
)

# diffusers' SD3ControlNetModel (and Stability's SD3.5 files, whose embedders carry diffusers' names).
SD3_CONTROLNET_DIFFUSERS_SENTINELS = (
    "pos_embed_input.proj.weight",
    "controlnet_blocks.0.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
)

HINTABLE = frozenset({"num_heads"})


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnknownModelError(f"SD3 ControlNet state dict lacks '{key}' (truncated or pruned file?)")
    return tuple(int(d) for d in sd[key].shape)


def derive_sd3_controlnet_config(sd: Mapping, hints: Mapping | None = None) -> SD3ControlNetConfig:
    """Canonical SD3 ControlNet state dict (names + shapes; meta tensors work) -> SD3ControlNetConfig."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_sd3_controlnet_config: hints {sorted(unknown)} are not allowed; shapes decide "
                         f"those (allowed: {sorted(HINTABLE)})")
    missing = [k for k in SD3_CONTROLNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an SD3 ControlNet state dict: missing {missing}; a diffusers "
                                "SD3ControlNetModel goes through diffstudio.convert.sd3_controlnet first")
    joint = "joint_blocks.0.x_block.attn.qkv.weight" in sd
    stem = "joint_blocks" if joint else "transformer_blocks"
    depth = count_indices(list(sd), stem)
    outs = count_indices(list(sd), "controlnet_blocks")
    if depth == 0 or depth != outs:
        raise UnknownModelError(f"SD3 ControlNet with {depth} {stem} and {outs} controlnet_blocks: it needs one "
                                "output Linear per block (truncated file, or not an SD3 ControlNet)")
    hidden = _shape(sd, "controlnet_blocks.0.weight")[0]
    _, hint_channels, patch, patch_w = _shape(sd, "pos_embed_input.proj.weight")
    if patch != patch_w:
        raise UnknownModelError(f"pos_embed_input.proj has a {patch}x{patch_w} kernel; MMDiT patches are square")
    in_channels, max_size = hint_channels, None
    if "x_embedder.proj.weight" in sd:
        in_channels = _shape(sd, "x_embedder.proj.weight")[1]
        positions = _shape(sd, "pos_embed")[-2]
        max_size = math.isqrt(positions)
        if max_size * max_size != positions:
            raise UnknownModelError(f"pos_embed holds {positions} positions, not a square grid")
    first = "joint_blocks.0.x_block" if joint else "transformer_blocks.0"
    qk_key = f"{first}.attn.ln_q.weight"
    heads = hints.get("num_heads")
    if qk_key in sd:
        heads = hidden // _shape(sd, qk_key)[0]
    elif heads is None:
        if hidden % HEAD_WIDTH:
            raise UnknownModelError(f"SD3 ControlNet width {hidden} is not a multiple of the SD3 head width "
                                    f"{HEAD_WIDTH}: pass hints={{'num_heads': N}} (a config.json carries it)")
        heads = hidden // HEAD_WIDTH
    return SD3ControlNetConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=int(heads),
        patch_size=patch,
        in_channels=in_channels,
        hint_channels=hint_channels,
        pos_embed_max_size=max_size,
        context_in_dim=_shape(sd, "context_embedder.weight")[1] if joint else None,
        adm_in_channels=_shape(sd, "y_embedder.mlp.0.weight")[1],
        mlp_hidden_size=_shape(sd, f"{first}.mlp.fc1.weight")[0],
        qk_norm="rms" if qk_key in sd else None,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
        frequency_embedding_size=_shape(sd, "t_embedder.mlp.0.weight")[1],
        zero_pooled=joint,
    )


def sd3_controlnet_config_from_diffusers(config_json: Mapping) -> SD3ControlNetConfig:
    """A diffusers ``SD3ControlNetModel`` config.json dict -> SD3ControlNetConfig (diffusers' defaults for
    absent fields)."""
    cfg = dict(config_json)
    heads, head_dim = int(cfg.get("num_attention_heads", 18)), int(cfg.get("attention_head_dim", 64))
    hidden = heads * head_dim
    joint_dim = cfg.get("joint_attention_dim", 4096)
    if joint_dim is not None and int(cfg.get("caption_projection_dim", 1152)) != hidden:
        raise UnknownModelError(f"SD3 ControlNet with caption_projection_dim {cfg.get('caption_projection_dim', 1152)}"
                                f" unlike its width {hidden}; no release does that and diffstudio does not support it")
    qk = cfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise UnknownModelError(f"SD3 ControlNet with qk_norm={qk!r}: diffstudio supports None and 'rms_norm'")
    max_size = cfg.get("pos_embed_max_size", 96)
    if cfg.get("use_pos_embed", True) and max_size is None:
        raise UnknownModelError("SD3 ControlNet with a position embedding but no pos_embed_max_size (sin-cos "
                                "positions made on the fly): no release does that and diffstudio does not support it")
    in_channels = int(cfg.get("in_channels", 16))
    return SD3ControlNetConfig(
        depth=int(cfg.get("num_layers", 18)),
        hidden_size=hidden,
        num_heads=heads,
        patch_size=int(cfg.get("patch_size", 2)),
        in_channels=in_channels,
        hint_channels=in_channels + int(cfg.get("extra_conditioning_channels", 0)),
        pos_embed_max_size=int(max_size) if cfg.get("use_pos_embed", True) else None,
        context_in_dim=None if joint_dim is None else int(joint_dim),
        adm_in_channels=int(cfg.get("pooled_projection_dim", 2048)),
        mlp_hidden_size=4 * hidden,  # diffusers' FeedForward: mult 4
        qk_norm="rms" if qk else None,
        dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        zero_pooled=bool(cfg.get("force_zeros_for_pooled_projection", True)),
    )
