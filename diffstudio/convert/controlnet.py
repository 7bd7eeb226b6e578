"""cldm ControlNet <-> diffusers ControlNetModel state dicts (pure renames, no tensor copies).

The encoder half and middle block are the UNet's: their renames come from the UNet map
(`diffstudio.convert.unet`), generated from the same block structure, with the decoder's entries
left out. The ControlNet's own modules add three generated groups:

    input_hint_block.0              <-> controlnet_cond_embedding.conv_in
    input_hint_block.2 (j+1)        <-> controlnet_cond_embedding.blocks.j    (j = 0 .. 2(K-1)-1)
    input_hint_block.2 (2K-1)       <-> controlnet_cond_embedding.conv_out    (K hint widths)
    zero_convs.i.0                  <-> controlnet_down_blocks.i              (one per input block)
    middle_block_out.0              <-> controlnet_mid_block

A ControlNet-Union's own layers (``UNION_MODULES``) keep their names in both layouts.

Both directions are rule lists of the one engine (`diffstudio.convert.rules`) and end with `check_conversion`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.rules import Rule, from_canonical, rule, same, to_canonical
from diffstudio.convert.unet import Structure, module_pairs
from diffstudio.errors import ConversionError
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel

# UNet modules a ControlNet has (LDM prefixes): everything before the decoder.
_ENCODER_PREFIXES = ("time_embed.", "label_emb.", "encoder_hid_proj", "input_blocks.", "middle_block.")
# A ControlNet-Union's condition path (models/controlnet_union.py): the release's names, the same in both layouts.
UNION_MODULES = ("task_embedding", "transformer_layes", "spatial_ch_projs", "control_add_embedding")


def hint_block_pairs(theirs: str, hint_widths: int) -> list[tuple[str, str]]:
    """cldm's ``input_hint_block`` convs (at 0, 2, 4, ...) and diffusers' ``ControlNetConditioningEmbedding``
    under ``theirs`` (conv_in, blocks.j, conv_out), for a hint encoder of ``hint_widths`` stages. XLabs' FLUX
    ControlNets have the same encoder (diffstudio.convert.flux_controlnet)."""
    convs = 2 * hint_widths  # conv_in, two per widening stage, conv_out
    return [("input_hint_block.0", f"{theirs}.conv_in"),
            *((f"input_hint_block.{2 * (j + 1)}", f"{theirs}.blocks.{j}") for j in range(convs - 2)),
            (f"input_hint_block.{2 * (convs - 1)}", f"{theirs}.conv_out")]


def _rules(structure: Structure, hint_widths: int, union: bool = False) -> list[Rule]:
    """The rules of a ControlNet: each (cldm module, diffusers module) pair, and renamed sub-layers; ``union``:
    a ControlNet-Union's own layers too."""
    pairs = [p for p in module_pairs(structure) if p[0].startswith(_ENCODER_PREFIXES)]
    pairs += [(ours, theirs, {}) for ours, theirs in hint_block_pairs("controlnet_cond_embedding", hint_widths)]
    inputs = 1 + sum(structure.num_res_blocks) + len(structure.num_res_blocks) - 1  # conv_in, ResBlocks, Downsamples
    pairs += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", {}) for i in range(inputs)]
    pairs.append(("middle_block_out.0", "controlnet_mid_block", {}))
    return [r for ldm, dif, sub in pairs
            for r in (rule(ldm, dif), *(rule(f"{ldm}.{old}", f"{dif}.{new}") for old, new in sub.items()))] + \
        (same(*UNION_MODULES) if union else [])


def _hint_widths_of_diffusers_keys(keys) -> int:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))) or len(blocks) % 2:
        raise ConversionError(f"diffusers ControlNet controlnet_cond_embedding.blocks are {sorted(blocks)}: expected "
                              "an even count 0..N-1 (two convs per stage). Not a ControlNetModel state dict.")
    return len(blocks) // 2 + 1


def _meta_state_dict(config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Every key and shape of the cldm layout of `config` (built on the meta device)."""
    with torch.device("meta"):
        return ControlNetModel(config).state_dict()


def controlnet_from_diffusers(sd: Mapping) -> dict:
    """diffusers ControlNetModel state dict (no prefix) -> cldm state dict (no ``control_model.`` prefix).

    The structure is counted from the diffusers keys; the result is checked against a ControlNet built
    on the meta device at the config derived from the result.
    """
    # Imported here: the detect package's __init__ imports the family records (import cycle otherwise).
    from diffstudio.detect.controlnet import derive_controlnet_config

    rules = _rules(Structure.of_diffusers_keys(sd.keys()), _hint_widths_of_diffusers_keys(sd.keys()),
                   union="task_embedding" in sd)
    # Heads and GroupNorm groups do not change any shape; 1 and 1 fit every width.
    return to_canonical("diffusers ControlNet -> cldm", sd, rules, lambda out: _meta_state_dict(
        derive_controlnet_config(out, {"num_heads": 1, "norm_groups": 1})))


def controlnet_to_diffusers(sd: Mapping, config: ControlNetConfig) -> dict:
    """cldm ControlNet state dict (no ``control_model.`` prefix) -> diffusers ControlNetModel layout."""
    rules = _rules(Structure.of_config(config), len(config.hint_block_channels), bool(config.num_control_types))
    return from_canonical("cldm ControlNet -> diffusers", sd, rules, _meta_state_dict(config))
