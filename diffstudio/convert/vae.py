"""AutoencoderKL state dicts: diffusers layout <-> the original LDM layout (our canonical names).

The map is a rule list (``diffstudio.convert.rules``) generated from the structure (number of levels and
blocks per level, counted from the keys or taken from the config), level by level. ResNet blocks keep
their layer names except the shortcut (``nin_shortcut`` <-> ``conv_shortcut``); diffusers orders the
decoder's levels from low to high resolution, LDM the other way. Attention projections are 1x1 convs
in LDM (4-D weights, (C, C, 1, 1)) and Linear layers in diffusers (2-D, (C, C)): ``Conv1x1``. Older
diffusers files name them query/key/value/proj_attn (read, never written).
Both directions end in ``check_conversion`` against our model built on the meta device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from diffstudio.convert.rules import CONV_1X1, COPY, Rule, from_canonical, rule, same, to_canonical
from diffstudio.detect.vae import count_indices, derive_vae_config
from diffstudio.errors import ConversionError
from diffstudio.models.vae import AutoencoderKL, VAEConfig

# Attention layers: LDM name -> (diffusers name, older diffusers name or None).
_ATTENTION = {"norm": ("group_norm", None), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
              "proj_out": ("to_out.0", "proj_attn")}


def _resnet(ours: str, theirs: str) -> list[Rule]:
    return [rule(ours, theirs), rule(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")]


def _attention(ours: str, theirs: str) -> list[Rule]:
    out = []
    for leaf, (name, older) in _ATTENTION.items():
        how = COPY if leaf == "norm" else CONV_1X1
        out.append(rule(f"{ours}.{leaf}", f"{theirs}.{name}", how))
        if older is not None:
            out.append(rule(f"{ours}.{leaf}", f"{theirs}.{older}", how, read_only=True))
    return out


def rules(levels: int, num_res_blocks: int) -> list[Rule]:
    """The rules of an autoencoder with this many levels and encoder blocks per level (the decoder has one
    more)."""
    out = same("quant_conv", "post_quant_conv")
    for side in ("encoder", "decoder"):
        out += [*same(f"{side}.conv_in", f"{side}.conv_out"), rule(f"{side}.norm_out", f"{side}.conv_norm_out"),
                *_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0"),
                *_attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"),
                *_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")]
    for level in range(levels):
        ours, theirs = f"encoder.down.{level}", f"encoder.down_blocks.{level}"
        for j in range(num_res_blocks):
            out += _resnet(f"{ours}.block.{j}", f"{theirs}.resnets.{j}")
        out.append(rule(f"{ours}.downsample", f"{theirs}.downsamplers.0"))
        ours, theirs = f"decoder.up.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for j in range(num_res_blocks + 1):
            out += _resnet(f"{ours}.block.{j}", f"{theirs}.resnets.{j}")
        out.append(rule(f"{ours}.upsample", f"{theirs}.upsamplers.0"))
    return out


def _meta_state_dict(config: VAEConfig, with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Names and shapes our model expects; without the encoder half for decoder-only files."""
    config = dataclasses.replace(config, norm_groups=1)  # groups change no name or shape
    with torch.device("meta"):
        sd = AutoencoderKL(config).state_dict()
    if not with_encoder:
        sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    return sd


def vae_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> canonical (LDM) state dict."""
    levels = count_indices(sd, "decoder.up_blocks")
    num_res_blocks = count_indices(sd, "decoder.up_blocks.0.resnets") - 1
    if levels == 0 or num_res_blocks < 1:
        raise ConversionError("no diffusers decoder.up_blocks.N.resnets.M keys found: this is not a "
                              "diffusers AutoencoderKL state dict (is it already in the LDM layout?).")

    def expected(out: dict) -> dict:
        derived = derive_vae_config(out, {"norm_groups": 1})  # groups change no name or shape
        return _meta_state_dict(derived, with_encoder="encoder.conv_in.weight" in out)

    return to_canonical("diffusers -> LDM VAE", sd, rules(levels, num_res_blocks), expected)


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Canonical (LDM) state dict -> diffusers AutoencoderKL state dict (current names, Linear attention)."""
    return from_canonical("LDM -> diffusers VAE", sd, rules(config.levels, config.num_res_blocks),
                          _meta_state_dict(config, with_encoder="encoder.conv_in.weight" in sd))
