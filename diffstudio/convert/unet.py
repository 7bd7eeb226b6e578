"""LDM UNet <-> diffusers UNet2DConditionModel state dicts (pure renames, no tensor copies).

The map is generated from the block structure (levels, ResBlocks per level, which levels have
attention): each LDM module prefix pairs with one diffusers module prefix, and ResBlocks rename
their sub-layers. Transformer internals (norm, proj_in, transformer_blocks.K.attn1...) have the
same names in both layouts. Both directions end with `check_conversion`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.errors import ConversionError
from diffstudio.models.unet import UNetConfig, UNetModel

# ResBlock sub-layers: LDM name -> diffusers name.
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# Modules outside the levels: LDM prefix -> diffusers prefix.
_TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "encoder_hid_proj": "encoder_hid_proj",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


@dataclass(frozen=True)
class _Structure:
    """What the key map depends on: ResBlocks per level and which levels have attention."""

    num_res_blocks: tuple[int, ...]
    attention: tuple[bool, ...]

    @classmethod
    def of_config(cls, config: UNetConfig) -> _Structure:
        return cls(tuple(config.num_res_blocks), tuple(d > 0 for d in config.transformer_depth))

    @classmethod
    def of_diffusers_keys(cls, keys) -> _Structure:
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


def _module_pairs(s: _Structure) -> list[tuple[str, str, dict[str, str]]]:
    """(LDM module prefix, diffusers module prefix, sub-layer renames LDM -> diffusers), in model order."""
    pairs = [(ldm, dif, {}) for ldm, dif in _TOP_LEVEL.items()]
    levels = len(s.num_res_blocks)
    n = 1
    for level in range(levels):
        for j in range(s.num_res_blocks[level]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _RESBLOCK))
            if s.attention[level]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", {}))
            n += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}))
            n += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", _RESBLOCK),
              ("middle_block.1", "mid_block.attentions.0", {}),
              ("middle_block.2", "mid_block.resnets.1", _RESBLOCK)]
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(s.num_res_blocks[level] + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", _RESBLOCK))
            if s.attention[level]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", {}))
            if level != 0 and j == s.num_res_blocks[level]:
                index = 2 if s.attention[level] else 1
                pairs.append((f"output_blocks.{n}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", {}))
            n += 1
    return pairs


class _KeyMap:
    """Renames keys module by module: the longest known module prefix, then its sub-layer renames."""

    def __init__(self, pairs: list[tuple[str, str, dict[str, str]]], to_diffusers: bool):
        self.modules = {}
        for ldm, dif, sub in pairs:
            if to_diffusers:
                self.modules[ldm] = (dif, sub)
            else:
                self.modules[dif] = (ldm, {v: k for k, v in sub.items()})

    def __call__(self, key: str) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            found = self.modules.get(".".join(parts[:cut]))
            if found is not None:
                target, sub = found
                rest = ".".join(parts[cut:])
                for old, new in sub.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                return f"{target}.{rest}"
        return None


def _rename(sd: Mapping, key_map: _KeyMap) -> tuple[dict, list[str]]:
    out, consumed = {}, []
    for key, value in sd.items():
        new = key_map(key)
        if new is not None:
            out[new] = value
            consumed.append(key)
    return out, consumed


def _meta_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the canonical layout of `config` (built on the meta device)."""
    with torch.device("meta"):
        model = UNetModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def unet_from_diffusers(sd: Mapping) -> dict:
    """diffusers UNet2DConditionModel state dict (no 'unet.' prefix) -> LDM state dict.

    The structure is counted from the diffusers keys; the result is checked against an LDM UNet
    built on the meta device at the config derived from the result.
    """
    # Imported here: the detect package's __init__ imports the family records, which may import us.
    from diffstudio.detect.unet import derive_unet_config

    structure = _Structure.of_diffusers_keys(sd.keys())
    out, consumed = _rename(sd, _KeyMap(_module_pairs(structure), to_diffusers=False))
    check_conversion("diffusers UNet -> LDM", sd.keys(), consumed, out)
    # Heads and GroupNorm groups do not change any shape; 1 and 1 fit every width.
    config = derive_unet_config(out, {"num_heads": 1, "norm_groups": 1})
    check_conversion("diffusers UNet -> LDM", sd.keys(), consumed, out, _meta_shapes(config))
    return out


def unet_to_diffusers(sd: Mapping, config: UNetConfig) -> dict:
    """LDM UNet state dict (no 'model.diffusion_model.' prefix) -> diffusers UNet2DConditionModel layout."""
    key_map = _KeyMap(_module_pairs(_Structure.of_config(config)), to_diffusers=True)
    expected_ldm = _meta_shapes(config)
    expected, _ = _rename(expected_ldm, key_map)
    if len(expected) != len(expected_ldm):
        raise ConversionError("LDM -> diffusers UNet: the generated key map does not cover the model built "
                              f"from {config}; this is a diffstudio bug, please report it.")
    out, consumed = _rename(sd, key_map)
    check_conversion("LDM UNet -> diffusers", sd.keys(), consumed, out, expected)
    return out
