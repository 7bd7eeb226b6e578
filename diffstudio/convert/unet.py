"""LDM UNet <-> diffusers UNet2DConditionModel state dicts (pure renames, no tensor copies).

The map is a rule list (``diffstudio.convert.rules``) generated from the block structure (levels,
ResBlocks per level, which levels have attention): each LDM module pairs with one diffusers module,
and ResBlocks rename their sub-layers. Transformer internals (norm, proj_in, transformer_blocks.K.attn1...)
have the same names in both layouts. Both directions end with `check_conversion`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from diffstudio.convert.rules import Rule, from_canonical, rule, to_canonical
from diffstudio.detect.unet import derive_unet_config
from diffstudio.errors import ConversionError
from diffstudio.models.unet import UNetConfig, UNetModel

# ResBlock sub-layers: LDM name -> diffusers name.
RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# Modules outside the levels: LDM prefix -> diffusers prefix.
_TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "encoder_hid_proj": "encoder_hid_proj",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


@dataclass(frozen=True)
class Structure:
    """What the key map depends on: ResBlocks per level and which levels have attention."""

    num_res_blocks: tuple[int, ...]
    attention: tuple[bool, ...]

    @classmethod
    def of_config(cls, config: UNetConfig) -> Structure:
        return cls(tuple(config.num_res_blocks), tuple(d > 0 for d in config.transformer_depth))

    @classmethod
    def of_diffusers_keys(cls, keys) -> Structure:
        """Count down_blocks.I.resnets.J / .attentions.J in a diffusers state dict."""
        resnets: dict[int, set[int]] = {}
        attentions: set[int] = set()
        for k in keys:
            m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", k)
            if m:
                level = int(m.group(1))
                resnets.setdefault(level, set())
                if m.group(2) == "resnets":
                    resnets[level].add(int(m.group(3)))
                else:
                    attentions.add(level)
        levels = len(resnets)
        if sorted(resnets) != list(range(levels)) or levels == 0:
            raise ConversionError(f"diffusers UNet down_blocks are {sorted(resnets)}: expected 0..N-1. Not "
                                  "a UNet2DConditionModel state dict, or strip its 'unet.' prefix first.")
        return cls(tuple(len(resnets[i]) for i in range(levels)),
                   tuple(i in attentions for i in range(levels)))


def module_pairs(s: Structure) -> list[tuple[str, str, dict[str, str]]]:
    """(LDM module prefix, diffusers module prefix, sub-layer renames LDM -> diffusers), in model order."""
    pairs = [(ldm, dif, {}) for ldm, dif in _TOP_LEVEL.items()]
    levels = len(s.num_res_blocks)
    n = 1
    for level in range(levels):
        for j in range(s.num_res_blocks[level]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", RESBLOCK))
            if s.attention[level]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", {}))
            n += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}))
            n += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", RESBLOCK),
              ("middle_block.1", "mid_block.attentions.0", {}),
              ("middle_block.2", "mid_block.resnets.1", RESBLOCK)]
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(s.num_res_blocks[level] + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", RESBLOCK))
            if s.attention[level]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", {}))
            if level != 0 and j == s.num_res_blocks[level]:
                index = 2 if s.attention[level] else 1
                pairs.append((f"output_blocks.{n}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", {}))
            n += 1
    return pairs


def rules(s: Structure) -> list[Rule]:
    """Each module pair as a rule, and each renamed ResBlock sub-layer as a longer (so preferred) one."""
    return [r for ldm, dif, sub in module_pairs(s)
            for r in (rule(ldm, dif), *(rule(f"{ldm}.{old}", f"{dif}.{new}") for old, new in sub.items()))]


def _meta_state_dict(config: UNetConfig) -> dict[str, torch.Tensor]:
    """Every key and shape of the canonical layout of `config` (built on the meta device)."""
    with torch.device("meta"):
        return UNetModel(config).state_dict()


def unet_from_diffusers(sd: Mapping) -> dict:
    """diffusers UNet2DConditionModel state dict (no 'unet.' prefix) -> LDM state dict.

    The structure is counted from the diffusers keys; the result is checked against an LDM UNet
    built on the meta device at the config derived from the result.
    """
    structure = Structure.of_diffusers_keys(sd.keys())
    # Heads and GroupNorm groups do not change any shape; 1 and 1 fit every width.
    return to_canonical("diffusers UNet -> LDM", sd, rules(structure),
                        lambda out: _meta_state_dict(derive_unet_config(out, {"num_heads": 1, "norm_groups": 1})))


def unet_to_diffusers(sd: Mapping, config: UNetConfig) -> dict:
    """LDM UNet state dict (no 'model.diffusion_model.' prefix) -> diffusers UNet2DConditionModel layout."""
    return from_canonical("LDM UNet -> diffusers", sd, rules(Structure.of_config(config)), _meta_state_dict(config))
