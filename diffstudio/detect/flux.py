"""Recognise a FLUX.1 transformer and derive its ``FluxConfig`` from key names and tensor shapes.

What shapes reveal (BFL layout):
    hidden_size, in_channels   ``img_in.weight``                          (hidden, in)
    out_channels               ``final_layer.linear.weight``              (out, hidden)
    context_in_dim             ``txt_in.weight``                          (hidden, 4096 for T5-XXL)
    vec_in_dim                 ``vector_in.in_layer.weight``              (hidden, 768 for CLIP-L)
    num_heads                  hidden / width of ``...query_norm.scale``  (the QK RMSNorm acts per head)
    mlp_ratio                  rows of ``double_blocks.0.img_mlp.0.weight`` / hidden
                               (or, without double blocks, the width of linear1 beyond 3 hidden)
    depth, depth_single_blocks count of ``double_blocks.N`` / ``single_blocks.N``
    guidance_embed             ``guidance_in.*`` present: FLUX.1-dev (guidance-distilled); absent: schnell
    qkv_bias                   ``double_blocks.0.img_attn.qkv.bias`` present

What they cannot reveal: the RoPE split of a head over the three position axes (RoPE has no
weights). FLUX.1 uses 16 / 56 / 56 of its 128-wide heads (BFL's ``axes_dim``); another head width
needs ``hints={"axes_dim": [...]}`` or the config stored with the weights. Theta is 10000.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import UnknownModelError
from diffstudio.models.flux import FluxConfig

FLUX_SENTINELS = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "final_layer.adaLN_modulation.1.weight",
)
FLUX_DIFFUSERS_SENTINELS = (
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "norm_out.linear.weight",
)
FLUX1_AXES_DIM = (16, 56, 56)  # of a 128-wide head


def _count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise UnknownModelError(f"FLUX {prefix} are not numbered 0..N-1 (found {sorted(found)}): the file is "
                                "truncated or damaged")
    return len(found)


def axes_dim_for(head_dim: int, hints: Mapping | None = None) -> tuple[int, ...]:
    if hints and hints.get("axes_dim"):
        return tuple(int(a) for a in hints["axes_dim"])
    if head_dim == sum(FLUX1_AXES_DIM):
        return FLUX1_AXES_DIM
    raise UnknownModelError(f"FLUX heads of width {head_dim} (FLUX.1 has 128): the RoPE split over the "
                            "three position axes cannot be read from weights. Pass hints={'axes_dim': [a, b, c]} "
                            "or use a file that stores its config (diffstudio's own files do).")


def derive_flux_config(sd: Mapping, hints: Mapping | None = None) -> FluxConfig:
    """Canonical (BFL) state dict, names and shapes only -> FluxConfig."""
    missing = [k for k in FLUX_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a FLUX transformer state dict in BFL layout: missing {missing}")
    return FluxConfig(out_channels=int(sd["final_layer.linear.weight"].shape[0]), **trunk_fields(sd, hints))


def trunk_fields(sd: Mapping, hints: Mapping | None = None) -> dict:
    """The `FluxConfig` fields the embedders and blocks reveal (all but ``out_channels``), BFL names: shared by
    the transformer and its ControlNets (diffstudio.detect.flux_controlnet)."""
    keys = list(sd)
    hidden, in_channels = (int(d) for d in sd["img_in.weight"].shape)
    depth, single = _count(keys, "double_blocks"), _count(keys, "single_blocks")
    if depth:
        head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
        mlp_hidden = int(sd["double_blocks.0.img_mlp.0.weight"].shape[0])
    elif single:
        head_dim = int(sd["single_blocks.0.norm.query_norm.scale"].shape[0])
        mlp_hidden = int(sd["single_blocks.0.linear1.weight"].shape[0]) - 3 * hidden
    else:
        raise UnknownModelError("FLUX transformer without double or single blocks")
    if hidden % head_dim:
        raise UnknownModelError(f"FLUX QK-norm width {head_dim} does not divide the hidden size {hidden}")
    return dict(
        in_channels=in_channels,
        vec_in_dim=int(sd["vector_in.in_layer.weight"].shape[1]),
        context_in_dim=int(sd["txt_in.weight"].shape[1]),
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=axes_dim_for(head_dim, hints),
        theta=int((hints or {}).get("theta", 10_000)),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd or not depth,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def config_from_diffusers(config_json: Mapping) -> FluxConfig:
    """A diffusers ``FluxTransformer2DModel`` config.json dict -> FluxConfig."""
    cfg = dict(config_json)
    if int(cfg.get("patch_size", 1)) != 1:
        raise UnknownModelError(f"FluxTransformer2DModel with patch_size {cfg['patch_size']}: FLUX.1 packs 2x2 "
                                "patches outside the model (patch_size 1)")
    heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
    in_channels = int(cfg.get("in_channels", 64))
    return FluxConfig(
        in_channels=in_channels,
        out_channels=int(cfg.get("out_channels") or in_channels),
        vec_in_dim=int(cfg.get("pooled_projection_dim", 768)),
        context_in_dim=int(cfg.get("joint_attention_dim", 4096)),
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,  # diffusers' FLUX blocks fix it (FeedForward mult 4, single-block mlp_ratio 4)
        num_heads=heads,
        depth=int(cfg.get("num_layers", 19)),
        depth_single_blocks=int(cfg.get("num_single_layers", 38)),
        axes_dim=tuple(cfg.get("axes_dims_rope", FLUX1_AXES_DIM)),
        guidance_embed=bool(cfg.get("guidance_embeds", False)),
    )
