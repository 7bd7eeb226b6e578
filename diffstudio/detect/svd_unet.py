"""Recognise the SVD spatio-temporal UNet and derive its `SVDUNetConfig` from key names and tensor shapes.

Keys are relative to the UNet (strip ``model.diffusion_model.`` first). The spatial skeleton is read like the
LDM UNet's (``detect/unet.py``: widths per level, ResBlocks counted between Downsamples, transformer depths
counted); the temporal layers (``time_stack`` in every ResBlock and transformer) are what tell it apart.

What shapes cannot reveal: the head width (64 in the release), the GroupNorm groups (32), how many added time
ids share ``label_emb`` (3: fps, motion bucket, noise augmentation) and the number of frames the checkpoint was
trained for (14 for SVD, 25 for SVD-XT): those come from ``hints`` (a stored config, a config.json) or the
release conventions.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.detect.unet import block_count, encoder_levels, transformer_depths
from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.models.svd_unet import SVDUNetConfig

SVD_UNET_SENTINELS = (
    "input_blocks.0.0.weight",
    "time_embed.0.weight",
    "label_emb.0.0.weight",
    "middle_block.0.time_stack.in_layers.2.weight",
    "middle_block.1.time_pos_embed.0.weight",
    "out.2.weight",
)

SVD_UNET_DIFFUSERS_SENTINELS = (
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "add_embedding.linear_1.weight",
    "mid_block.resnets.0.temporal_res_block.conv1.weight",
    "mid_block.attentions.0.time_pos_embed.linear_1.weight",
    "conv_out.weight",
)

RELEASE_HINTS = {"num_head_channels": 64, "norm_groups": 32, "num_added_time_ids": 3, "num_frames": 25}


def derive_svd_unet_config(sd: Mapping, hints: Mapping | None = None) -> SVDUNetConfig:
    """Release-layout SVD UNet state dict (names + shapes) -> SVDUNetConfig. See the module docstring."""
    hints = {**RELEASE_HINTS, **dict(hints or {})}
    missing = [k for k in SVD_UNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an SVD UNet state dict: missing {missing}. Strip the 'model.diffusion_model.' "
                                "prefix first; a diffusers-layout UNet goes through "
                                "diffstudio.convert.svd_unet.svd_unet_from_diffusers.")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"SVD UNet state dict lacks '{key}' (truncated or pruned file?)")
        return tuple(sd[key].shape)

    keys = list(sd)
    depths = transformer_depths(keys)
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    channel_mult, num_res_blocks, transformer_depth = encoder_levels(sd, shape, depths, model_channels, "SVD UNet")
    expected_out = [d for level in reversed(range(len(channel_mult)))
                    for d in [transformer_depth[level]] * (num_res_blocks[level] + 1)]
    found_out = [depths.get(f"output_blocks.{n}.1", 0) for n in range(block_count(keys, "output_blocks"))]
    if found_out != expected_out:
        raise UnknownModelError(f"SVD UNet output blocks have transformer depths {found_out}, expected {expected_out} "
                                "from the input side; asymmetric UNets are not supported.")
    adm = shape("label_emb.0.0.weight")[1]
    ids = int(hints["num_added_time_ids"])
    if adm % ids:
        raise UnknownModelError(f"SVD UNet label_emb takes {adm} inputs, which do not split into {ids} added time "
                                "id embeddings")
    return SVDUNetConfig(
        in_channels=in_channels, out_channels=shape("out.2.weight")[0], model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
        transformer_depth_middle=depths.get("middle_block.1", 0),
        context_dim=shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        num_head_channels=int(hints["num_head_channels"]), addition_time_embed_dim=adm // ids,
        num_added_time_ids=ids, norm_groups=int(hints["norm_groups"]), num_frames=int(hints["num_frames"]))


_DOWN = {"CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False}
_UP = {"CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False}


def config_from_diffusers(config_json: Mapping) -> SVDUNetConfig:
    """A diffusers ``UNetSpatioTemporalConditionModel`` config.json -> SVDUNetConfig (its defaults are SVD's)."""
    cfg = dict(config_json)
    block_out = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(block_out)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"]))
    up = list(cfg.get("up_block_types", ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3))
    if len(down) != levels or any(t not in _DOWN for t in down) or [_UP.get(t) for t in up] != \
            [_DOWN[t] for t in reversed(down)]:
        raise ConversionError(f"diffusers SVD UNet block types {down} / {up} are not mirrored (Cross)Attn "
                              "Down/UpBlockSpatioTemporal blocks, one per block_out_channels entry")
    attention = [_DOWN[t] for t in down]

    def per_level(value, name: str) -> list[int]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
        if len(values) != levels or any(isinstance(v, (list, tuple)) for v in values):
            raise ConversionError(f"diffusers SVD UNet {name}={value!r}: one integer per level expected")
        return [int(v) for v in values]

    layers = per_level(cfg.get("layers_per_block", 2), "layers_per_block")
    depth = per_level(cfg.get("transformer_layers_per_block", 1), "transformer_layers_per_block")
    heads = per_level(cfg.get("num_attention_heads", (5, 10, 20, 20)), "num_attention_heads")
    used = [(block_out[i], heads[i]) for i in range(levels) if attention[i]] + [(block_out[-1], heads[-1])]
    widths = {w // h for w, h in used if w % h == 0}
    if len(widths) != 1 or any(w % h for w, h in used):
        raise ConversionError(f"diffusers SVD UNet heads {heads} for widths {block_out} do not give one head width")
    context = cfg.get("cross_attention_dim", 1024)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise ConversionError(f"diffusers SVD UNet cross_attention_dim varies per level ({context})")
        context = context[0]
    time_dim = int(cfg.get("addition_time_embed_dim", 256))
    adm = int(cfg.get("projection_class_embeddings_input_dim", 768))
    if adm % time_dim:
        raise ConversionError(f"diffusers SVD UNet projection_class_embeddings_input_dim {adm} is not a multiple of "
                              f"addition_time_embed_dim {time_dim}")
    if block_out[0] <= 0 or any(c % block_out[0] for c in block_out):
        raise ConversionError(f"diffusers SVD UNet block_out_channels {block_out} are not multiples of the first")
    return SVDUNetConfig(
        in_channels=int(cfg.get("in_channels", 8)), out_channels=int(cfg.get("out_channels", 4)),
        model_channels=block_out[0], channel_mult=[c // block_out[0] for c in block_out], num_res_blocks=layers,
        transformer_depth=[d if a else 0 for d, a in zip(depth, attention)], transformer_depth_middle=depth[-1],
        context_dim=int(context), num_head_channels=widths.pop(), addition_time_embed_dim=time_dim,
        num_added_time_ids=adm // time_dim, norm_groups=32, num_frames=int(cfg.get("num_frames", 25)))
