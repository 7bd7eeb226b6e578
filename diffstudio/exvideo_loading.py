"""Graft an ExVideo-SVD extension file onto a loaded SVD UNet (docs/svd.md, "ExVideo").

The file (models/exvideo_file.py) is recognised by structure; its tensors are renamed to our UNet's names
(convert/exvideo.py) with every key accounted for; each SpatialVideoTransformer gets an `ExVideoPositions`
(position table + 3x3x3 convolution, models/exvideo.py) and the fine-tuned temporal weights replace the base's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.convert.exvideo import diffsynth_temporal_blocks, exvideo_to_unet_names
from diffstudio.detect.exvideo import derive_exvideo_config, is_exvideo_patch
from diffstudio.errors import ConversionError
from diffstudio.models.exvideo import ExVideoPositions
from diffstudio.models.svd_unet import SVDUNet


def graft_exvideo(unet: SVDUNet, state_dict: Mapping) -> SVDUNet:
    """Add an ExVideo extension (its state dict, DiffSynth names) to ``unet`` in place and return it.

    Afterwards the UNet indexes each block's trained position table by frame (so it runs up to the table's length,
    128 frames for ExVideo-SVD-128f-v1) and convolves the temporal branch's input. Raises ConversionError when the
    file is not an ExVideo extension or does not fit this UNet.
    """
    if not isinstance(unet, SVDUNet):
        raise ConversionError(f"ExVideo extends the SVD UNet; got a {type(unet).__name__}")
    if not is_exvideo_patch(state_dict):
        heads = sorted({k.split(".")[0] for k in state_dict})[:6]
        raise ConversionError(f"not an ExVideo-SVD extension (no blocks.7.positional_embedding / positional_conv "
                              f"keys; its top-level keys are {heads})")
    config = derive_exvideo_config(state_dict)
    blocks = dict(diffsynth_temporal_blocks(unet.config))
    if sorted(blocks) != config.block_ids:
        raise ConversionError(f"the ExVideo extension has temporal blocks {config.block_ids}; this SVD UNet's are "
                              f"{sorted(blocks)}. Use an extension trained for this base model.")
    modules = dict(unet.named_modules())
    weight = unet.time_embed[0].weight
    for prefix in blocks.values():
        block = modules[prefix]
        block.exvideo = ExVideoPositions(block.time_pos_embed[0].in_features, config.positions).to(
            device=weight.device, dtype=weight.dtype)
    expected = unet.state_dict()
    ours = exvideo_to_unet_names(state_dict, unet.config, expected)
    with torch.no_grad():
        for key, tensor in ours.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    return unet
