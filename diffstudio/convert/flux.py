"""FLUX.1 transformer state dicts: diffusers ``FluxTransformer2DModel`` <-> BFL's original layout.

The map is generated from the config (one rule per parameter, loops over the blocks), and both
directions read the same rules, so they cannot drift apart. Three kinds of rule:

* ``copy``: one tensor, renamed (``img_in`` <-> ``x_embedder``, ``img_mod.lin`` <-> ``norm1.linear``
  with the same (shift, scale, gate) x 2 order on both sides);
* ``cat``:  BFL fuses what diffusers keeps apart, along the output (row) dimension:
  ``img_attn.qkv`` = [to_q; to_k; to_v], ``txt_attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj],
  ``single_blocks.N.linear1`` = [to_q; to_k; to_v; proj_mlp] (widths hidden, hidden, hidden, mlp);
* ``swap``: the final adaLN. BFL's ``final_layer.adaLN_modulation.1`` produces (shift, scale);
  diffusers' ``norm_out.linear`` (AdaLayerNormContinuous) produces (scale, shift): the two row halves
  trade places (an exchange, so the same rule maps both ways).

The QK-norm weights are ``...norm.query_norm.scale`` in BFL and ``attn.norm_q.weight`` in diffusers.
Every conversion ends with ``check_conversion``: every input key consumed, every expected key
produced, every shape equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.errors import ConversionError
from diffstudio.models.flux import FluxConfig

StateDict = dict[str, torch.Tensor]
Rule = tuple[str, tuple[str, ...], str]  # (BFL key, diffusers keys, "copy" | "cat" | "swap")


def _linear(bfl: str, diffusers: str | tuple[str, ...], kind: str = "copy", bias: bool = True) -> Iterator[Rule]:
    parts = (diffusers,) if isinstance(diffusers, str) else diffusers
    for suffix in ("weight", "bias") if bias else ("weight",):
        yield f"{bfl}.{suffix}", tuple(f"{p}.{suffix}" for p in parts), kind


def rules(config: FluxConfig) -> list[Rule]:
    """Every parameter of the model, as a rule between the two layouts."""
    out: list[Rule] = []
    add = out.extend
    add(_linear("img_in", "x_embedder"))
    add(_linear("txt_in", "context_embedder"))
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, dif in embedders:
        add(_linear(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1"))
        add(_linear(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2"))
    for i in range(config.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, ff, q, k, v, out_proj, nq, nk in (
            ("img", "norm1", "ff", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"),
            ("txt", "norm1_context", "ff_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "norm_added_q", "norm_added_k"),
        ):
            add(_linear(f"{b}.{stream}_mod.lin", f"{d}.{mod}.linear"))
            add(_linear(f"{b}.{stream}_attn.qkv", (f"{d}.attn.{q}", f"{d}.attn.{k}", f"{d}.attn.{v}"), "cat",
                        bias=config.qkv_bias))
            out.append((f"{b}.{stream}_attn.norm.query_norm.scale", (f"{d}.attn.{nq}.weight",), "copy"))
            out.append((f"{b}.{stream}_attn.norm.key_norm.scale", (f"{d}.attn.{nk}.weight",), "copy"))
            add(_linear(f"{b}.{stream}_attn.proj", f"{d}.attn.{out_proj}"))
            add(_linear(f"{b}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj"))
            add(_linear(f"{b}.{stream}_mlp.2", f"{d}.{ff}.net.2"))
    for i in range(config.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        add(_linear(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), "cat"))
        add(_linear(f"{b}.linear2", f"{d}.proj_out"))
        out.append((f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), "copy"))
        out.append((f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), "copy"))
        add(_linear(f"{b}.modulation.lin", f"{d}.norm.linear"))
    add(_linear("final_layer.linear", "proj_out"))
    add(_linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"))
    return out


def _split_sizes(bfl_key: str, n_parts: int, config: FluxConfig) -> list[int]:
    h = config.hidden_size
    if ".linear1." in bfl_key:  # single block: q, k, v, MLP input
        return [h, h, h, config.mlp_hidden]
    return [h] * n_parts


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def _bfl_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    from diffstudio.models.flux import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- diffusers -> BFL -----------------------------------------------------------------------------

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _count(keys, prefix: str) -> int:
    return len({int(m.group(2)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == prefix})


def layout_config(sd: Mapping) -> FluxConfig:
    """The block structure a diffusers-layout state dict implies (names and shapes only): enough to
    generate the rules. RoPE has no weights, so ``axes_dim`` is only a valid placeholder here; the
    model's real config comes from config.json or detection (diffstudio.detect.flux)."""
    try:
        hidden, in_channels = sd["x_embedder.weight"].shape
        head_dim = _first_shape(sd, ("transformer_blocks.0.attn.norm_q.weight",
                                     "single_transformer_blocks.0.attn.norm_q.weight"))[0]
        mlp_hidden = _first_shape(sd, ("transformer_blocks.0.ff.net.0.proj.weight",
                                       "single_transformer_blocks.0.proj_mlp.weight"))[0]
        config = dict(
            in_channels=int(in_channels), out_channels=int(sd["proj_out.weight"].shape[0]),
            vec_in_dim=int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
            context_in_dim=int(sd["context_embedder.weight"].shape[1]),
            hidden_size=int(hidden), mlp_ratio=mlp_hidden / hidden, num_heads=int(hidden) // int(head_dim),
            depth=_count(sd, "transformer_blocks"), depth_single_blocks=_count(sd, "single_transformer_blocks"),
            qkv_bias="transformer_blocks.0.attn.to_q.bias" in sd or "transformer_blocks.0.attn.to_q.weight" not in sd,
            guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in sd,
        )
    except KeyError as err:
        raise ConversionError(f"not a diffusers FluxTransformer2DModel state dict: no {err}") from err
    head_dim = int(head_dim)
    first = max(2, head_dim // 16 * 2)
    return FluxConfig(**config, axes_dim=(first, head_dim - first))


def _first_shape(sd: Mapping, keys: tuple[str, ...]) -> tuple[int, ...]:
    for key in keys:
        if key in sd:
            return tuple(sd[key].shape)
    raise KeyError(keys[0])


def flux_from_diffusers(sd: Mapping, config: FluxConfig | None = None) -> StateDict:
    """diffusers FluxTransformer2DModel state dict -> BFL layout (checked)."""
    config = config or layout_config(sd)
    out: StateDict = {}
    consumed: list[str] = []
    for bfl, parts, kind in rules(config):
        missing = [p for p in parts if p not in sd]
        if missing:
            raise ConversionError(f"diffusers FLUX state dict lacks {missing[0]} (for {bfl}); the file is "
                                  "truncated or a different FLUX variant than its shapes suggest")
        tensors = [sd[p] for p in parts]
        if kind == "cat":
            out[bfl] = torch.cat(tensors, dim=0)
        elif kind == "swap":
            out[bfl] = _swap_halves(tensors[0])
        else:
            out[bfl] = tensors[0]
        consumed.extend(parts)
    check_conversion("FLUX diffusers -> BFL", sd.keys(), consumed, out, _bfl_shapes(config))
    return out


# -- BFL -> diffusers -----------------------------------------------------------------------------


def flux_to_diffusers(sd: Mapping, config: FluxConfig) -> StateDict:
    """BFL-layout state dict -> diffusers FluxTransformer2DModel layout (checked)."""
    shapes = _bfl_shapes(config)
    check_conversion("FLUX BFL state dict", sd.keys(), [k for k in sd if k in shapes],
                     {k: sd[k] for k in sd if k in shapes}, shapes)
    out: StateDict = {}
    expected: dict[str, tuple[int, ...]] = {}
    for bfl, parts, kind in rules(config):
        t = sd[bfl]
        if kind == "cat":
            pieces = torch.split(t, _split_sizes(bfl, len(parts), config), dim=0)
            out.update(zip(parts, pieces, strict=True))
        elif kind == "swap":
            out[parts[0]] = _swap_halves(t)
        else:
            out[parts[0]] = t
        sizes = _split_sizes(bfl, len(parts), config) if kind == "cat" else [shapes[bfl][0]]
        expected.update({p: (n, *shapes[bfl][1:]) for p, n in zip(parts, sizes, strict=True)})
    check_conversion("FLUX BFL -> diffusers", sd.keys(), list(sd.keys()), out, expected)
    return out
