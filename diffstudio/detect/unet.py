"""Recognise an LDM UNet and derive its `UNetConfig` from key names and tensor shapes.

Only names and shapes are read (meta tensors and lazy safetensors work). Keys are relative to the
UNet: strip ``model.diffusion_model.`` first.

What shapes reveal: in/out channels (``input_blocks.0.0``, ``out.2``), the base width and each
level's multiplier (ResBlock conv widths), ResBlocks per level (counted between Downsamples),
transformer depth per level (``transformer_blocks.K`` counted), context width (``attn2.to_k``
inputs), conv vs linear projections (``proj_in`` rank), SDXL's vector width (``label_emb.0.0``).

What shapes cannot reveal: how a transformer's width splits into heads, and the GroupNorm groups.
Those come from ``hints`` (a family's published convention, or a stored config). Without a head
hint we apply the LDM release conventions, keyed on a structural fact rather than a guess:
conv ``proj_in`` (SD 1.x) -> ``num_heads=8``; linear ``proj_in`` (SD 2.x, SDXL, Kolors) ->
``num_head_channels=64``. Groups default to 32 (every LDM release).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.models.unet import UNetConfig

# Canonical (LDM) keys that identify a UNet (relative to model.diffusion_model.).
UNET_SENTINELS = (
    "input_blocks.0.0.weight",
    "time_embed.0.weight",
    "middle_block.0.in_layers.2.weight",
    "out.2.weight",
)

# The same in the diffusers UNet2DConditionModel layout (time_embedding tells it from a VAE).
UNET_DIFFUSERS_SENTINELS = (
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "mid_block.resnets.0.conv1.weight",
    "conv_out.weight",
)

_TRANSFORMER_BLOCK = re.compile(r"^(.*)\.transformer_blocks\.(\d+)\.")


def transformer_depths(keys) -> dict[str, int]:
    """Module prefix of each SpatialTransformer -> number of transformer blocks in it."""
    depths: dict[str, int] = {}
    for k in keys:
        m = _TRANSFORMER_BLOCK.match(k)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def block_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise UnknownModelError(f"UNet '{prefix}' indices are not consecutive: {sorted(found)}; the file "
                                "is truncated or not an LDM UNet.")
    return len(found)


def _heads(hints: Mapping, linear: bool) -> tuple[int, int]:
    num_heads = hints.get("num_heads", -1) or -1
    head_channels = hints.get("num_head_channels", -1) or -1
    if num_heads != -1 and head_channels != -1:
        raise ValueError("hints give both num_heads and num_head_channels; give one (the other -1)")
    if num_heads == -1 and head_channels == -1:
        # LDM release conventions (see module docstring): SD 1.x 8 heads, later models 64-wide heads.
        return (-1, 64) if linear else (8, -1)
    return num_heads, head_channels


def derive_unet_config(sd: Mapping, hints: Mapping | None = None) -> UNetConfig:
    """Canonical UNet state dict (names + shapes) -> UNetConfig. See the module docstring."""
    hints = dict(hints or {})
    missing = [k for k in UNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an LDM UNet state dict: missing {missing}. Strip the "
                                "'model.diffusion_model.' prefix first; a diffusers-layout UNet goes "
                                "through diffstudio.convert.unet.unet_from_diffusers.")
    keys = list(sd.keys())

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"LDM UNet state dict lacks '{key}' (truncated or pruned file?)")
        return tuple(sd[key].shape)

    depths = transformer_depths(keys)
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    out_channels = shape("out.2.weight")[0]

    channel_mult, num_res_blocks, transformer_depth = encoder_levels(sd, shape, depths, model_channels, "UNet")

    # Output side must mirror it (num_res_blocks + 1 blocks per level, same depths).
    expected_out = [d for lvl in reversed(range(len(channel_mult))) for d in [transformer_depth[lvl]] *
                    (num_res_blocks[lvl] + 1)]
    n_outputs = block_count(keys, "output_blocks")
    found_out = [depths.get(f"output_blocks.{n}.1", 0) for n in range(n_outputs)]
    if found_out != expected_out:
        raise UnknownModelError(f"UNet output blocks have transformer depths {found_out}, expected "
                                f"{expected_out} from the input side; asymmetric UNets are not supported.")

    return UNetConfig(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                      channel_mult=channel_mult, num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
                      **shared_fields(sd, shape, depths, hints, "UNet"))


def encoder_levels(sd: Mapping, shape, depths: dict, model_channels: int, what: str):
    """Walk input_blocks 1.. (a Downsample closes a level) -> (channel_mult, num_res_blocks, transformer_depth).
    Shared by the UNet and its ControlNet (a copy of the UNet's encoder)."""
    widths: list[list[int]] = [[]]
    level_depths: list[list[int]] = [[]]
    for n in range(1, block_count(list(sd), "input_blocks")):
        if f"input_blocks.{n}.0.op.weight" in sd:
            widths.append([])
            level_depths.append([])
        elif f"input_blocks.{n}.0.in_layers.2.weight" in sd:
            widths[-1].append(shape(f"input_blocks.{n}.0.in_layers.2.weight")[0])
            level_depths[-1].append(depths.get(f"input_blocks.{n}.1", 0))
        else:
            raise UnknownModelError(f"{what} input_blocks.{n} is neither a ResBlock nor a Downsample: "
                                    "not an LDM UNet encoder")
    channel_mult, num_res_blocks, transformer_depth = [], [], []
    for level, (ws, ds) in enumerate(zip(widths, level_depths)):
        if not ws or len(set(ws)) != 1 or len(set(ds)) != 1 or ws[0] % model_channels:
            raise UnknownModelError(f"{what} level {level} has ResBlock widths {ws} and transformer depths "
                                    f"{ds}; an LDM UNet has one width (a multiple of {model_channels}) "
                                    "and one depth per level.")
        channel_mult.append(ws[0] // model_channels)
        num_res_blocks.append(len(ws))
        transformer_depth.append(ds[0])
    return channel_mult, num_res_blocks, transformer_depth


def shared_fields(sd: Mapping, shape, depths: dict, hints: Mapping, what: str) -> dict:
    """The UNetConfig fields read from the middle block, the attention layers and the embeddings."""
    depth_middle = depths.get("middle_block.1", 0)
    if depth_middle == 0:
        raise UnknownModelError(f"{what} middle block has no SpatialTransformer; not a supported LDM {what}")
    linear = len(shape("middle_block.1.proj_in.weight")) == 2
    to_k = next((k for k in sd if k.endswith(".attn2.to_k.weight")), None)
    num_heads, head_channels = _heads(hints, linear)
    return dict(
        transformer_depth_middle=depth_middle, context_dim=shape(to_k)[1] if to_k else None,
        num_heads=num_heads, num_head_channels=head_channels, use_linear_in_transformer=linear,
        adm_in_channels=shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in sd else None,
        norm_groups=int(hints.get("norm_groups", 32)),
        encoder_hid_dim=shape("encoder_hid_proj.weight")[1] if "encoder_hid_proj.weight" in sd else None,
    )


# --------------------------------------------------------------------------------------------
# diffusers config.json -> UNetConfig
# --------------------------------------------------------------------------------------------

# diffusers options that our UNet does not implement, with the only value it can take.
_FIXED_DIFFUSERS_OPTIONS = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
    "conv_out_kernel": 3, "dual_cross_attention": False, "only_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "time_cond_proj_dim": None,
    "timestep_post_act": None, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "attention_type": "default", "cross_attention_norm": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
}


def _is_value(value, only) -> bool:
    """`value` (or every entry of a per-level list) equals `only`; None and False count as unset."""
    if isinstance(value, (list, tuple)):
        return all(_is_value(v, only) for v in value)
    if only in (None, False):
        return value in (None, False)
    return value == only


def _per_level(value, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ConversionError(f"diffusers UNet config: {name} has {len(values)} entries for {levels} levels")
    return values


def _depth(entry, name: str) -> int:
    """transformer_layers_per_block entries may be per-block lists; the LDM UNet has one per level."""
    if isinstance(entry, (list, tuple)):
        if len(set(entry)) != 1:
            raise ConversionError(f"diffusers UNet config: {name} varies within a level ({entry}); the LDM "
                                  "UNet has one transformer depth per level.")
        return int(entry[0])
    return int(entry)


def config_from_diffusers(config_json: Mapping) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` config.json -> UNetConfig.

    Heads: diffusers' ``attention_head_dim`` is, for historical reasons, the number of heads
    whenever ``num_attention_heads`` is not set (SD 1.5: 8; SD 2.x/SDXL: per-level counts such as
    [5, 10, 20, 20], i.e. 64-channel heads). Equal counts on every attention level map to
    ``num_heads``, otherwise an equal head width maps to ``num_head_channels``.
    """
    cfg = dict(config_json)
    for key, only in _FIXED_DIFFUSERS_OPTIONS.items():
        if key in cfg and not _is_value(cfg[key], only):
            raise ConversionError(f"diffusers UNet config has {key}={cfg[key]!r}; diffstudio's LDM UNet only "
                                  f"supports {only!r}. This is a different architecture than SD/SDXL.")
    block_out = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(block_out)
    down_types = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]))
    up_types = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)))
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in known for t in down_types) or len(down_types) != levels:
        raise ConversionError(f"diffusers UNet down_block_types {down_types} are not all "
                              "CrossAttnDownBlock2D / DownBlock2D (one per block_out_channels entry)")
    attention = [known[t] for t in down_types]
    mirrored = [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)]
    if up_types != mirrored:
        raise ConversionError(f"diffusers UNet up_block_types {up_types} do not mirror the down blocks "
                              f"({mirrored} expected)")
    mid_type = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ConversionError(f"diffusers UNet mid_block_type {mid_type!r} is not supported "
                              "(the LDM UNet's middle block is UNetMidBlock2DCrossAttn)")
    if block_out[0] <= 0 or any(c % block_out[0] for c in block_out):
        raise ConversionError(f"diffusers UNet block_out_channels {block_out} are not multiples of the first")

    layers = [int(n) for n in _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")]
    tlpb = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    depth = [_depth(d, "transformer_layers_per_block") if a else 0 for d, a in zip(tlpb, attention)]
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is not None:
        rev = [_depth(d, "reverse_transformer_layers_per_block") for d in reverse]
        if [d for d, a in zip(rev, reversed(attention)) if a] != [d for d in reversed(depth) if d]:
            raise ConversionError(f"diffusers UNet reverse_transformer_layers_per_block {reverse} differs "
                                  "from the down side; asymmetric UNets are not supported.")
    depth_middle = _depth(tlpb[-1], "transformer_layers_per_block")

    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise ConversionError(f"diffusers UNet cross_attention_dim varies per level ({context})")
        context = context[0]

    heads_raw = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = [int(h) for h in _per_level(heads_raw, levels, "attention_head_dim")]
    # (width, heads) of every transformer: attention levels, then the middle (it uses the last entry).
    used = [(block_out[i], heads[i]) for i in range(levels) if attention[i]] + [(block_out[-1], heads[-1])]
    if len({h for _, h in used}) == 1:
        num_heads, head_channels = used[0][1], -1
    elif all(c % h == 0 for c, h in used) and len({c // h for c, h in used}) == 1:
        num_heads, head_channels = -1, used[0][0] // used[0][1]
    else:
        raise ConversionError(f"diffusers UNet heads {heads} for widths {block_out} give neither a constant "
                              "head count nor a constant head width; the LDM UNet needs one of them.")

    addition = cfg.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ConversionError(f"diffusers UNet addition_embed_type {addition!r} is not supported "
                              "(only SDXL's 'text_time')")
    hid_type = cfg.get("encoder_hid_dim_type")
    hid_dim = cfg.get("encoder_hid_dim")
    if hid_dim is not None and hid_type not in (None, "text_proj"):
        raise ConversionError(f"diffusers UNet encoder_hid_dim_type {hid_type!r} is not supported "
                              "(only Kolors' 'text_proj')")
    adm = int(cfg["projection_class_embeddings_input_dim"]) if addition == "text_time" else None
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        model_channels=block_out[0], channel_mult=[c // block_out[0] for c in block_out],
        num_res_blocks=layers, transformer_depth=depth, transformer_depth_middle=depth_middle,
        context_dim=int(context), num_heads=num_heads, num_head_channels=head_channels,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        adm_in_channels=adm,
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        encoder_hid_dim=int(hid_dim) if hid_dim is not None else None,
    )
