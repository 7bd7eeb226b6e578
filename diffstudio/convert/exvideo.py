"""ExVideo-SVD extension file names (DiffSynth-Studio's ``blocks.<i>...``) -> our SVD UNet's names.

DiffSynth numbers the SVD UNet as one flat list of blocks, in which every spatial layer is followed by push /
temporal / pop-and-mix helpers; `diffsynth_temporal_blocks` walks that list for any UNet config and returns
the index of each temporal transformer block with the release-layout prefix of the SpatialVideoTransformer it
belongs to (7 -> input_blocks.1.1, 83 -> middle_block.1, 195 -> output_blocks.11.1 for SVD-XT). Inside a block:

    positional_embedding.embeddings -> <prefix>.exvideo.embeddings   (grafted, models/exvideo.py)
    positional_conv                 -> <prefix>.exvideo.conv         (grafted)
    positional_embedding_proj.0 / 2 -> <prefix>.time_pos_embed.0 / 2
    norm_in / act_fn_in.proj / ff_in -> <prefix>.time_stack.0.norm_in / ff_in.net.0.proj / ff_in.net.2
    norm1 attn1 norm2 attn2         -> <prefix>.time_stack.0.<same> (attnK.to_out -> attnK.to_out.0)
    norm_out / act_fn_out.proj / ff_out -> <prefix>.time_stack.0.norm3 / ff.net.0.proj / ff.net.2

The conversion ends with the usual check: every key of the file consumed, every shape equal to the grafted UNet's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.check import check_conversion
from diffstudio.convert.rules import Rule, apply_to_ours, rule
from diffstudio.errors import ConversionError

# DiffSynth's helper blocks around each layer (diffsynth/models/svd_unet.py, SVDUNet.blocks):
_RES_DOWN = 5       # ResnetBlock, PushBlock, TemporalResnetBlock, PopMixBlock, PushBlock
_ATTN_DOWN = 5      # AttentionBlock, PushBlock, TemporalAttentionBlock, PopMixBlock, PushBlock
_ATTN_MID_UP = 4    # AttentionBlock, PushBlock, TemporalAttentionBlock, PopMixBlock
_RES_UP = 5         # PopBlock, ResnetBlock, PushBlock, TemporalResnetBlock, PopMixBlock (+ PushBlock before attention)
_TEMPORAL_OFFSET = 2  # the TemporalAttentionBlock's place in an attention group

_INNER = {"positional_embedding.embeddings": "exvideo.embeddings", "positional_conv": "exvideo.conv",
          "positional_embedding_proj.0": "time_pos_embed.0", "positional_embedding_proj.2": "time_pos_embed.2",
          "norm_in": "time_stack.0.norm_in", "act_fn_in.proj": "time_stack.0.ff_in.net.0.proj",
          "ff_in": "time_stack.0.ff_in.net.2", "norm1": "time_stack.0.norm1", "attn1": "time_stack.0.attn1",
          "attn1.to_out": "time_stack.0.attn1.to_out.0", "norm2": "time_stack.0.norm2",
          "attn2": "time_stack.0.attn2", "attn2.to_out": "time_stack.0.attn2.to_out.0",
          "norm_out": "time_stack.0.norm3", "act_fn_out.proj": "time_stack.0.ff.net.0.proj",
          "ff_out": "time_stack.0.ff.net.2"}


def diffsynth_temporal_blocks(config) -> list[tuple[int, str]]:
    """(DiffSynth block index, our SpatialVideoTransformer prefix) of every temporal transformer, in model order.
    ``config``: an SVDUNetConfig (levels, ResBlocks per level, transformer depth per level)."""
    levels = len(config.channel_mult)
    found: list[tuple[int, str]] = []
    index, block = 0, 1                     # DiffSynth's position; our input block number (0 is conv_in)
    for level in range(levels):
        for _ in range(config.num_res_blocks[level]):
            index += _RES_DOWN
            if config.transformer_depth[level]:
                found.append((index + _TEMPORAL_OFFSET, f"input_blocks.{block}.1"))
                index += _ATTN_DOWN
            block += 1
        if level != levels - 1:
            index += 2                      # DownSampler, PushBlock
            block += 1
    index += _RES_DOWN                      # the middle: ResBlock group, attention group, ResBlock group
    found.append((index + _TEMPORAL_OFFSET, "middle_block.1"))
    index += _ATTN_MID_UP + 4               # ResnetBlock, PushBlock, TemporalResnetBlock, PopMixBlock
    block = 0
    for level in reversed(range(levels)):
        for _ in range(config.num_res_blocks[level] + 1):
            if config.transformer_depth[level]:
                index += _RES_UP + 1
                found.append((index + _TEMPORAL_OFFSET, f"output_blocks.{block}.1"))
                index += _ATTN_MID_UP
            else:
                index += _RES_UP
            block += 1
        if level:
            index += 1                      # UpSampler
    return found


def exvideo_rules(config) -> list[Rule]:
    return [rule(f"{prefix}.{ours}", f"blocks.{index}.{theirs}")
            for index, prefix in diffsynth_temporal_blocks(config) for theirs, ours in _INNER.items()]


def exvideo_to_unet_names(sd: Mapping, unet_config, expected: Mapping) -> dict[str, torch.Tensor]:
    """Extension file -> {our UNet key: tensor}, checked: every file key consumed, every shape equal to
    ``expected`` (the grafted UNet's state dict), and both new tensors present for every temporal block."""
    if any(d not in (0, 1) for d in [*unet_config.transformer_depth, unet_config.transformer_depth_middle]):
        raise ConversionError("ExVideo extensions exist for SVD UNets with one transformer block per "
                              f"level; this UNet has depths {unet_config.transformer_depth}")
    done = apply_to_ours(sd, exvideo_rules(unet_config))
    check_conversion("ExVideo extension -> SVD UNet", sd.keys(), done.consumed, done.out, None, done.problems)
    absent = [f"{prefix}.{name}" for _, prefix in diffsynth_temporal_blocks(unet_config)
              for name in ("exvideo.embeddings", "exvideo.conv.weight", "exvideo.conv.bias")
              if f"{prefix}.{name}" not in done.out]
    foreign = [k for k in done.out if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in done.out.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if absent or foreign or wrong:
        raise ConversionError(f"the ExVideo extension does not fit this SVD UNet: missing {absent[:4]}, "
                              f"unknown {foreign[:4]}, shape mismatches {wrong[:4]}. Use an extension trained for "
                              "this base model (ExVideo-SVD-128f-v1 extends SVD-XT).")
    return done.out
