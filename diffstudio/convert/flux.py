"""FLUX.1 transformer state dicts: diffusers ``FluxTransformer2DModel`` <-> BFL's original layout.

The map is a rule list (``diffstudio.convert.rules``) generated from the config, one rule per module,
read in both directions. Besides renames (``img_in`` <-> ``x_embedder``, ``img_mod.lin`` <-> ``norm1.linear``
with the same (shift, scale, gate) x 2 order on both sides):

* ``Fuse``: BFL fuses what diffusers keeps apart, along the output (row) dimension:
  ``img_attn.qkv`` = [to_q; to_k; to_v], ``txt_attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj],
  ``single_blocks.N.linear1`` = [to_q; to_k; to_v; proj_mlp] (widths hidden, hidden, hidden, mlp);
* ``SwapHalves``: the final adaLN. BFL's ``final_layer.adaLN_modulation.1`` produces (shift, scale);
  diffusers' ``norm_out.linear`` (AdaLayerNormContinuous) produces (scale, shift).

The QK-norm weights are ``...norm.query_norm.scale`` in BFL and ``attn.norm_q.weight`` in diffusers.
Both directions end in ``check_conversion`` against our model built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.rules import SWAP_HALVES, Fuse, Rule, from_canonical, rule, to_canonical
from diffstudio.errors import ConversionError
from diffstudio.models.flux import FluxConfig, FluxTransformer


def rules(config: FluxConfig) -> list[Rule]:
    """Every module of the model, as a rule between the two layouts."""
    return trunk_rules(config) + [rule("final_layer.linear", "proj_out"),
                                  rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP_HALVES)]


def trunk_rules(config: FluxConfig) -> list[Rule]:
    """The input embedders and the blocks (``FluxTrunk``: what the transformer and its ControlNets share)."""
    out = [rule("img_in", "x_embedder"), rule("txt_in", "context_embedder")]
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, dif in embedders:
        out += [rule(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1"),
                rule(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")]
    for i in range(config.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, ff, qkv, out_proj, nq, nk in (
            ("img", "norm1", "ff", ("to_q", "to_k", "to_v"), "to_out.0", "norm_q", "norm_k"),
            ("txt", "norm1_context", "ff_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
             "norm_added_q", "norm_added_k"),
        ):
            out += [rule(f"{b}.{stream}_mod.lin", f"{d}.{mod}.linear"),
                    rule(f"{b}.{stream}_attn.qkv", tuple(f"{d}.attn.{p}" for p in qkv), Fuse()),
                    rule(f"{b}.{stream}_attn.norm.query_norm.scale", f"{d}.attn.{nq}.weight"),
                    rule(f"{b}.{stream}_attn.norm.key_norm.scale", f"{d}.attn.{nk}.weight"),
                    rule(f"{b}.{stream}_attn.proj", f"{d}.attn.{out_proj}"),
                    rule(f"{b}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj"),
                    rule(f"{b}.{stream}_mlp.2", f"{d}.{ff}.net.2")]
    h = config.hidden_size
    for i in range(config.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        out += [rule(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
                     Fuse((h, h, h, config.mlp_hidden))),
                rule(f"{b}.linear2", f"{d}.proj_out"),
                rule(f"{b}.norm.query_norm.scale", f"{d}.attn.norm_q.weight"),
                rule(f"{b}.norm.key_norm.scale", f"{d}.attn.norm_k.weight"),
                rule(f"{b}.modulation.lin", f"{d}.norm.linear")]
    return out


def _meta_state_dict(config: FluxConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return FluxTransformer(config).state_dict()


# -- the structure a diffusers state dict implies ---------------------------------------------------

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _count(keys, prefix: str) -> int:
    return len({int(m.group(2)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == prefix})


def layout_config(sd: Mapping) -> FluxConfig:
    """The block structure a diffusers-layout state dict implies (names and shapes only): enough to
    generate the rules. RoPE has no weights, so ``axes_dim`` is only a valid placeholder here; the
    model's real config comes from config.json or detection (diffstudio.detect.flux)."""
    if "proj_out.weight" not in sd:
        raise ConversionError("not a diffusers FluxTransformer2DModel state dict: no 'proj_out.weight'")
    return FluxConfig(**trunk_layout(sd, "FluxTransformer2DModel"), out_channels=int(sd["proj_out.weight"].shape[0]))


def trunk_layout(sd: Mapping, what: str) -> dict:
    """The `FluxConfig` fields of the embedders and blocks a diffusers-layout state dict implies (see
    ``layout_config``); ``what`` names the expected class in the error."""
    try:
        hidden, in_channels = sd["x_embedder.weight"].shape
        head_dim = _first_shape(sd, ("transformer_blocks.0.attn.norm_q.weight",
                                     "single_transformer_blocks.0.attn.norm_q.weight"))[0]
        mlp_hidden = _first_shape(sd, ("transformer_blocks.0.ff.net.0.proj.weight",
                                       "single_transformer_blocks.0.proj_mlp.weight"))[0]
        config = dict(
            in_channels=int(in_channels),
            vec_in_dim=int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
            context_in_dim=int(sd["context_embedder.weight"].shape[1]),
            hidden_size=int(hidden), mlp_ratio=mlp_hidden / hidden, num_heads=int(hidden) // int(head_dim),
            depth=_count(sd, "transformer_blocks"), depth_single_blocks=_count(sd, "single_transformer_blocks"),
            qkv_bias="transformer_blocks.0.attn.to_q.bias" in sd or "transformer_blocks.0.attn.to_q.weight" not in sd,
            guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in sd,
        )
    except KeyError as err:
        raise ConversionError(f"not a diffusers {what} state dict: no {err}") from err
    head_dim = int(head_dim)
    first = max(2, head_dim // 16 * 2)
    return dict(config, axes_dim=(first, head_dim - first))


def _first_shape(sd: Mapping, keys: tuple[str, ...]) -> tuple[int, ...]:
    for key in keys:
        if key in sd:
            return tuple(sd[key].shape)
    raise KeyError(keys[0])


def flux_from_diffusers(sd: Mapping, config: FluxConfig | None = None) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL layout (checked)."""
    config = config or layout_config(sd)
    return to_canonical("FLUX diffusers -> BFL", sd, rules(config), _meta_state_dict(config))


def flux_to_diffusers(sd: Mapping, config: FluxConfig) -> dict[str, torch.Tensor]:
    """BFL-layout state dict -> diffusers FluxTransformer2DModel layout (checked)."""
    return from_canonical("FLUX BFL -> diffusers", sd, rules(config), _meta_state_dict(config))
