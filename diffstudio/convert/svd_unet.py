"""SVD UNet (generative-models' VideoUNet names) <-> diffusers UNetSpatioTemporalConditionModel state dicts.

The map is the LDM UNet's module pairing (``convert/unet.py``: the same levels, blocks and top-level layers),
widened for the temporal parts; pure renames, no tensor copies:

    input_blocks.N.0.<ResBlock layer>      <->  down_blocks.L.resnets.J.spatial_res_block.<diffusers name>
    input_blocks.N.0.time_stack.<layer>    <->  down_blocks.L.resnets.J.temporal_res_block.<diffusers name>
    input_blocks.N.0.time_mixer            <->  down_blocks.L.resnets.J.time_mixer
    input_blocks.N.1.time_stack.K          <->  down_blocks.L.attentions.J.temporal_transformer_blocks.K
    input_blocks.N.1.time_pos_embed.0 / 2  <->  down_blocks.L.attentions.J.time_pos_embed.linear_1 / linear_2
    label_emb.0.0 / 0.2                    <->  add_embedding.linear_1 / linear_2

Everything else inside a transformer (norm, proj_in, transformer_blocks, proj_out, time_mixer) keeps its
name. Both directions end with `check_conversion` against our model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.rules import Rule, from_canonical, rule, to_canonical
from diffstudio.convert.unet import RESBLOCK, Structure, module_pairs
from diffstudio.detect.svd_unet import derive_svd_unet_config
from diffstudio.models.svd_unet import SVDUNet, SVDUNetConfig


def rules(structure: Structure) -> list[Rule]:
    """The LDM UNet's module pairs, each ResBlock and transformer pair widened by its temporal layers."""
    out: list[Rule] = []
    for ours, theirs, sub in module_pairs(structure):
        out.append(rule(ours, theirs))
        if sub is RESBLOCK:
            for old, new in sub.items():
                out.append(rule(f"{ours}.{old}", f"{theirs}.spatial_res_block.{new}"))
                if old != "skip_connection":  # the temporal ResBlock keeps its width: no shortcut
                    out.append(rule(f"{ours}.time_stack.{old}", f"{theirs}.temporal_res_block.{new}"))
        elif ".attentions." in theirs:
            out += [rule(f"{ours}.time_stack", f"{theirs}.temporal_transformer_blocks"),
                    rule(f"{ours}.time_pos_embed.0", f"{theirs}.time_pos_embed.linear_1"),
                    rule(f"{ours}.time_pos_embed.2", f"{theirs}.time_pos_embed.linear_2")]
    return out


def _meta_state_dict(config: SVDUNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return SVDUNet(config).state_dict()


def svd_unet_from_diffusers(sd: Mapping) -> dict:
    """diffusers UNetSpatioTemporalConditionModel state dict (no 'unet.' prefix) -> release names."""
    structure = Structure.of_diffusers_keys(sd.keys())
    # Head width and groups change no shape; 1 fits every width.
    return to_canonical("diffusers SVD UNet -> release layout", sd, rules(structure),
                        lambda out: _meta_state_dict(derive_svd_unet_config(out, {"num_head_channels": 1,
                                                                                    "norm_groups": 1})))


def svd_unet_to_diffusers(sd: Mapping, config: SVDUNetConfig) -> dict:
    """Release-layout SVD UNet state dict (no 'model.diffusion_model.' prefix) -> diffusers layout."""
    return from_canonical("SVD UNet -> diffusers", sd, rules(Structure.of_config(config)), _meta_state_dict(config))
