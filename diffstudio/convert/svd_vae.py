"""SVD autoencoder state dicts: diffusers' ``AutoencoderKLTemporalDecoder`` <-> the release's names (ours).

The encoder, ``quant_conv``, the decoder's ``conv_in`` / ``norm_out``, its mid attention and its upsamplers are
named as in the image VAE, so their rules are the image VAE's (``convert.vae.rules``). What the temporal
decoder adds, per ResNet block (ours ``decoder.up.L.block.J`` / ``decoder.mid.block_N``, theirs
``decoder.up_blocks.(levels-1-L).resnets.J`` / ``decoder.mid_block.resnets.(N-1)``):

    norm1 conv1 norm2 conv2 nin_shortcut     <-> spatial_res_block.{norm1 conv1 norm2 conv2 conv_shortcut}
    time_stack.in_layers.0 / .2              <-> temporal_res_block.norm1 / conv1
    time_stack.out_layers.0 / .3             <-> temporal_res_block.norm2 / conv2
    mix_factor                               <-> time_mixer.mix_factor

and ``decoder.conv_out.time_mix_conv`` <-> ``decoder.time_conv_out``. Both directions end in
``check_conversion`` against our model built on the meta device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from diffstudio.convert.rules import Rule, from_canonical, rule, to_canonical
from diffstudio.convert.vae import rules as image_vae_rules
from diffstudio.detect.svd_vae import derive_temporal_vae_config
from diffstudio.detect.vae import count_indices
from diffstudio.errors import ConversionError
from diffstudio.models.svd_vae import TemporalAutoencoderKL, TemporalVAEConfig

# Image-VAE rules that carry over: everything but the decoder's ResNet blocks and the post_quant_conv.
_SHARED = ("encoder.", "quant_conv", "decoder.conv_in", "decoder.norm_out", "decoder.mid.attn_1")

_TEMPORAL = {"time_stack.in_layers.0": "norm1", "time_stack.in_layers.2": "conv1",
             "time_stack.out_layers.0": "norm2", "time_stack.out_layers.3": "conv2"}


def _video_resnet(ours: str, theirs: str) -> list[Rule]:
    out = [rule(ours, f"{theirs}.spatial_res_block"),
           rule(f"{ours}.nin_shortcut", f"{theirs}.spatial_res_block.conv_shortcut"),
           rule(f"{ours}.mix_factor", f"{theirs}.time_mixer.mix_factor")]
    out += [rule(f"{ours}.{a}", f"{theirs}.temporal_res_block.{b}") for a, b in _TEMPORAL.items()]
    return out


def rules(levels: int, num_res_blocks: int) -> list[Rule]:
    shared = [r for r in image_vae_rules(levels, num_res_blocks)
              if r.ours.startswith(_SHARED) or r.ours.endswith(".upsample")]
    out = shared + [rule("decoder.conv_out", "decoder.conv_out"),
                    rule("decoder.conv_out.time_mix_conv", "decoder.time_conv_out")]
    out += _video_resnet("decoder.mid.block_1", "decoder.mid_block.resnets.0")
    out += _video_resnet("decoder.mid.block_2", "decoder.mid_block.resnets.1")
    for level in range(levels):
        for j in range(num_res_blocks + 1):
            out += _video_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{levels - 1 - level}.resnets.{j}")
    return out


def _meta_state_dict(config: TemporalVAEConfig) -> dict[str, torch.Tensor]:
    config = dataclasses.replace(config, norm_groups=1)  # groups change no name or shape
    with torch.device("meta"):
        return TemporalAutoencoderKL(config).state_dict()


def temporal_vae_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLTemporalDecoder state dict -> the release's names."""
    levels = count_indices(sd, "decoder.up_blocks")
    num_res_blocks = count_indices(sd, "decoder.up_blocks.0.resnets") - 1
    if levels == 0 or num_res_blocks < 1:
        raise ConversionError("no diffusers decoder.up_blocks.N.resnets.M keys found: this is not a diffusers "
                              "AutoencoderKLTemporalDecoder state dict (is it already in the release's layout?).")
    if count_indices(sd, "decoder.mid_block.resnets") != 2:
        raise ConversionError("the decoder's mid block must hold 2 ResNet blocks (layers_per_block=2, as in every "
                              "released SVD VAE): the release's layout has exactly block_1 and block_2")

    def expected(out: dict) -> dict:
        return _meta_state_dict(derive_temporal_vae_config(out, {"norm_groups": 1}))

    return to_canonical("diffusers -> SVD temporal VAE", sd, rules(levels, num_res_blocks), expected)


def temporal_vae_to_diffusers(sd: Mapping[str, torch.Tensor], config: TemporalVAEConfig) -> dict[str, torch.Tensor]:
    """The release's names -> diffusers AutoencoderKLTemporalDecoder (which needs an encoder and quant_conv)."""
    if not (config.has_encoder and config.use_quant_conv):
        raise ConversionError("diffusers' AutoencoderKLTemporalDecoder has an encoder and a quant_conv: this VAE "
                              "lacks one (the release's first_stage_model has no quant_conv; take it from "
                              "conditioner.embedders.3.encoder, see diffstudio.families.svd)")
    return from_canonical("SVD temporal VAE -> diffusers", sd, rules(config.levels, config.num_res_blocks),
                          _meta_state_dict(config))
