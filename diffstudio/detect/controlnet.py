"""Recognise a ControlNet and derive its `ControlNetConfig` (and the family it is for) from names and shapes.

Only names and shapes are read (meta tensors and lazy safetensors work). Keys are relative to the
ControlNet: the cldm releases store them under ``control_model.`` (the v1.0 files bundle a whole SD
model beside them), v1.1 ``.pth`` files and most ``.safetensors`` files bare; diffusers
``ControlNetModel`` weights are converted first (`diffstudio.convert.controlnet`).

What shapes reveal is what they reveal for a UNet (`diffstudio.detect.unet`): base width and level
multipliers from the ResBlock convs, ResBlocks per level counted between Downsamples, transformer
depths counted, context width from ``attn2.to_k``, conv vs linear projections, SDXL's ``label_emb``
width; plus the hint encoder's input channels and stage widths (``input_hint_block`` convs). Heads and
norm groups come from hints (the family's UNet convention, or the base UNet's config when loading).

The family is decided like a UNet's: the first family record (in detection order) whose UNet test
accepts the ControlNet's config; a ControlNet is a copy of its base UNet's encoder, so the UNet's
structural signature (conv vs linear projections, ``label_emb``, transformer depths) carries over.

DiT ControlNets have their own architectures (FLUX: ``detect/flux_controlnet.py``); ``find_controlnet``
tries each in ``CONTROLNET_ARCHS`` and ``place_controlnet`` says which family each is for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.detect.unet import (
    block_count,
    config_from_diffusers,
    encoder_levels,
    shared_fields,
    transformer_depths,
)
from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.models.controlnet import ControlNetConfig

CONTROLNET_PREFIXES = ("control_model.", "")

CONTROLNET_SENTINELS = (
    "input_hint_block.0.weight",
    "zero_convs.0.0.weight",
    "middle_block_out.0.weight",
    "input_blocks.0.0.weight",
    "time_embed.0.weight",
    "middle_block.0.in_layers.2.weight",
)

CONTROLNET_DIFFUSERS_SENTINELS = (
    "controlnet_cond_embedding.conv_in.weight",
    "controlnet_down_blocks.0.weight",
    "controlnet_mid_block.weight",
    "conv_in.weight",
    "time_embedding.linear_1.weight",
)

_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)\.weight$")


def _hint_structure(sd: Mapping, model_channels: int) -> tuple[int, list[int]]:
    """(hint channels, stage widths) of the input_hint_block: convs at 0, 2, 4, ...; conv 2j (j >= 1)
    widens to the next stage, the last maps to the UNet's base width."""
    indices = sorted(int(m.group(1)) for k in sd if (m := _HINT_CONV.match(k)))
    convs = len(indices)
    if indices != list(range(0, 2 * convs, 2)) or convs < 2 or convs % 2:
        raise UnknownModelError(f"ControlNet input_hint_block convs sit at {indices}: expected an even number of "
                                "them at 0, 2, 4, ... (truncated file, or not a cldm ControlNet)")
    shapes = [tuple(sd[f"input_hint_block.{i}.weight"].shape) for i in indices]
    if shapes[-1][0] != model_channels:
        raise UnknownModelError(f"ControlNet hint encoder ends at {shapes[-1][0]} channels, its UNet encoder starts "
                                f"at {model_channels}: not a cldm ControlNet")
    widths = [shapes[0][0]] + [shapes[j][0] for j in range(2, convs - 1, 2)]
    return shapes[0][1], widths


def _union_fields(sd: Mapping, keys: list[str], model_channels: int, hints: Mapping) -> dict:
    """A ControlNet-Union's fields (models/controlnet_union.py) from shapes: the control types are the task
    embedding's rows, the condition blocks are counted, each one-hot value's Fourier width is control_add_embedding's
    input width over the types. The heads change no shape: the stored config's, a hint's, else xinsir's 8."""
    if "task_embedding" not in sd:
        return {}
    types, width = tuple(sd["task_embedding"].shape)
    if width != model_channels:
        raise UnknownModelError(f"ControlNet-Union task_embedding is {width} wide, its UNet encoder {model_channels}: "
                                "the condition tokens must have the encoder's base width")
    key = "control_add_embedding.linear_1.weight"
    if key not in sd:
        raise UnknownModelError(f"ControlNet-Union state dict has a task_embedding but no '{key}' (truncated file?)")
    inputs = sd[key].shape[1]
    if inputs % types:
        raise UnknownModelError(f"ControlNet-Union control_add_embedding takes {inputs} inputs, not a multiple of its "
                                f"{types} control types")
    return {"num_control_types": types, "union_layers": block_count(keys, "transformer_layes"),
            "union_heads": int(hints.get("union_heads", 8)), "control_type_dim": inputs // types}


def derive_controlnet_config(sd: Mapping, hints: Mapping | None = None) -> ControlNetConfig:
    """cldm ControlNet state dict (names + shapes) -> ControlNetConfig. See the module docstring."""
    hints = dict(hints or {})
    missing = [k for k in CONTROLNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a cldm ControlNet state dict: missing {missing}. Strip the 'control_model.' "
                                "prefix first; a diffusers ControlNetModel goes through "
                                "diffstudio.convert.controlnet.controlnet_from_diffusers.")
    keys = list(sd.keys())

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"ControlNet state dict lacks '{key}' (truncated or pruned file?)")
        return tuple(sd[key].shape)

    depths = transformer_depths(keys)
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]

    channel_mult, num_res_blocks, transformer_depth = encoder_levels(sd, shape, depths, model_channels,
                                                                     "ControlNet")
    n_inputs = block_count(keys, "input_blocks")
    if block_count(keys, "zero_convs") != n_inputs:
        raise UnknownModelError(f"ControlNet has {block_count(keys, 'zero_convs')} zero_convs for {n_inputs} input "
                                "blocks; it needs one per input block (truncated file?)")
    hint_channels, hint_widths = _hint_structure(sd, model_channels)
    return ControlNetConfig(
        in_channels=in_channels, model_channels=model_channels, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
        **shared_fields(sd, shape, depths, hints, "ControlNet"),
        hint_channels=hint_channels, hint_block_channels=hint_widths,
        global_average_pooling=bool(hints.get("global_average_pooling", False)),
        **_union_fields(sd, keys, model_channels, hints),
    )


def controlnet_config_from_diffusers(config_json: Mapping) -> ControlNetConfig:
    """A diffusers ``ControlNetModel`` config.json -> ControlNetConfig (the UNet fields read as a UNet's)."""
    cfg = dict(config_json)
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ConversionError(f"diffusers ControlNet controlnet_conditioning_channel_order={order!r}: only 'rgb' "
                              "control images are supported; convert the image's channel order instead")
    # A ControlNet has no decoder: give the UNet reader the mirror of the encoder it expects.
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    cfg["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
    unet = config_from_diffusers(cfg)
    union = cfg.get("_class_name") == UNION_CLASS or "num_control_type" in cfg
    return ControlNetConfig.from_unet(
        unet, hint_channels=int(cfg.get("conditioning_channels", 3)),
        hint_block_channels=list(cfg.get("conditioning_embedding_out_channels")
                                 or ((48, 96, 192, 384) if union else (16, 32, 96, 256))),
        global_average_pooling=bool(cfg.get("global_pool_conditions", False)),
        **(_union_config_from_diffusers(cfg, unet) if union else {}))


UNION_CLASS = "ControlNetUnionModel"  # diffusers' class of the SDXL ControlNet-Union (xinsir)


def _union_config_from_diffusers(cfg: Mapping, unet) -> dict:
    """A ``ControlNetUnionModel`` config.json's union fields (diffusers' defaults where a key is absent)."""
    widths = {cfg.get("num_trans_channel", 320), cfg.get("num_proj_channel", 320)}
    if widths != {unet.model_channels}:
        raise ConversionError(f"ControlNetUnionModel num_trans_channel / num_proj_channel {sorted(widths)} differ "
                              f"from its base width {unet.model_channels}: the condition tokens are the encoder's "
                              "features, so they must be equal")
    return {"num_control_types": int(cfg.get("num_control_type", 6)), "union_heads": int(cfg.get("num_trans_head", 8)),
            "union_layers": int(cfg.get("num_trans_layer", 1)),
            "control_type_dim": int(cfg.get("addition_time_embed_dim") or 256)}


def union_variant(config) -> str | None:
    """How `diffstudio info` names a ControlNet-Union: 'ControlNet-Union, 6 control types' (xinsir's
    controlnet-union-sdxl-1.0) or '... ProMax ...' (8: tile and repaint added); None for other ControlNets."""
    types = getattr(config, "num_control_types", None)
    if not types:
        return None
    return f"ControlNet-Union{' ProMax' if types == 8 else ''}, {types} control types"


def controlnet_config_from_dict(data: Mapping) -> ControlNetConfig:
    return ControlNetConfig.from_dict(dict(data))


# --------------------------------------------------------------------------------------------
# Placing a ControlNet: which family's UNet it belongs to
# --------------------------------------------------------------------------------------------

ROLE = "controlnet"  # the component name a ControlNet gets in a Detection


def controlnet_family(sub: Mapping, stored: Mapping | None = None):
    """(family, config) of a canonical ControlNet state dict: the first UNet family (detection order) whose
    UNet test accepts it, the config derived with that family's UNet hints (or the stored config)."""
    from diffstudio.families import FAMILIES

    reasons = []
    for family in FAMILIES:
        unet_role = family.role(family.denoiser_role)
        if unet_role.arch != "ldm_unet":
            continue
        config = (controlnet_config_from_dict(stored[ROLE]) if stored and ROLE in stored
                  else derive_controlnet_config(sub, unet_role.hints))
        reason = family.check_denoiser(config)
        if reason is None:
            return family, config
        reasons.append(f"{family.name}: {reason}")
    raise UnknownModelError("this is a ControlNet, but for no model family diffstudio knows (it is a copy of its "
                            f"base UNet's encoder, and no family's UNet test accepts it): {'; '.join(reasons)}")


# The ControlNet architectures, tried in this order: the UNet ControlNets, then the DiT ones
# (`place_controlnet` says which family's model each is for).
CONTROLNET_ARCHS = ("controlnet", "xlabs_flux_controlnet", "flux_controlnet")  # XLabs' match InstantX's sentinels


def place_controlnet(arch: str, sub: Mapping, stored: Mapping | None = None, hints: Mapping | None = None):
    """(family, config) of a canonical ControlNet state dict of architecture ``arch``."""
    if arch == ROLE:
        return controlnet_family(sub, stored)
    from diffstudio.components import ARCHS
    from diffstudio.detect.flux_controlnet import FAMILY
    from diffstudio.families import get_family

    record = ARCHS[arch]
    config = (record.config_from_dict(stored[ROLE]) if stored and ROLE in stored
              else record.derive_config(sub, hints))
    return get_family(FAMILY), config


def find_controlnet(sd: Mapping, stored: Mapping | None = None, hints: Mapping | None = None):
    """A ControlNet's `Component` (role "controlnet") and its family record, or None when `sd` holds none.

    Looks under ``control_model.`` then at bare keys, for each architecture of ``CONTROLNET_ARCHS`` in its
    canonical then its diffusers names. ``hints``: what a DiT ControlNet's shapes cannot tell (the base's
    RoPE split)."""
    from diffstudio.components import ARCHS
    from diffstudio.detect import Component, find_component, parameter_count, storage_dtype

    for arch in CONTROLNET_ARCHS:
        found = find_component(sd, ARCHS[arch], CONTROLNET_PREFIXES)
        if found is not None:
            prefix, layout, sub = found
            family, config = place_controlnet(arch, sub, stored, hints)
            return Component(ROLE, arch, prefix, layout, config, parameter_count(sub), storage_dtype(sub)), family
    return None


def detect_controlnet(sd: Mapping, stored: Mapping | None = None):
    """A lone ControlNet file -> a `Detection` naming the family it is for, its one component "controlnet";
    None when `sd` is no ControlNet. Keys outside it must be non-weight keys (else it is no lone ControlNet)."""
    from diffstudio.detect import NON_WEIGHT_KEYS, Detection

    found = find_controlnet(sd, stored)
    if found is None:
        return detect_dit_controlnet(sd, stored)
    component, family = found
    others = sorted(k for k in sd if component.prefix and not k.startswith(component.prefix))
    if not all(k in NON_WEIGHT_KEYS for k in others):
        return None
    return Detection(family.name, {ROLE: component}, union_variant(component.config), others)


def attach_bundled_controlnet(detection, sd: Mapping, stored: Mapping | None = None):
    """A whole model that also carries a ControlNet under ``control_model.`` (the cldm v1.0 release files):
    add the ControlNet to the detection (when it fits the detected family) and take its keys off the ignored."""
    prefix = CONTROLNET_PREFIXES[0]
    if not any(k.startswith(prefix) for k in detection.ignored):
        return detection
    found = find_controlnet({k: v for k, v in sd.items() if k.startswith(prefix)}, stored)
    if found is None or found[1].name != detection.family:
        return detection
    detection.components[ROLE] = found[0]
    detection.ignored = [k for k in detection.ignored if not k.startswith(prefix)]
    return detection


# --------------------------------------------------------------------------------------------
# DiT ControlNets: each family's own architecture (not a copy of a UNet encoder)
# --------------------------------------------------------------------------------------------

# (diffusers class name in a folder's config.json, family, component architecture in diffstudio.components)
DIT_CONTROLNETS = (
    ("SD3ControlNetModel", "sd3", "sd3_controlnet"),
    ("HunyuanDiT2DControlNetModel", "hunyuan_dit", "hunyuan_dit_controlnet"),
)


def detect_dit_controlnet(sd: Mapping, stored: Mapping | None = None):
    """A DiT family's ControlNet (bare keys, its architecture's own or diffusers names) -> a `Detection` with its
    one component "controlnet", the config from ``stored`` or derived from shapes; None when `sd` is none."""
    from diffstudio.components import ARCHS
    from diffstudio.detect import NON_WEIGHT_KEYS, Component, Detection, parameter_count, storage_dtype

    for _, family, arch_name in DIT_CONTROLNETS:
        arch = ARCHS[arch_name]
        if not (arch.is_canonical(sd) or arch.is_diffusers(sd)):
            continue
        weights = {k: v for k, v in sd.items() if k not in NON_WEIGHT_KEYS}
        canonical = arch.to_canonical(weights)
        config = (arch.config_from_dict(stored[ROLE]) if stored and ROLE in stored
                  else arch.derive_config(canonical, {}))
        layout = "original" if arch.is_canonical(sd) else arch.other_layout
        component = Component(ROLE, arch_name, "", layout, config, parameter_count(canonical),
                              storage_dtype(canonical))
        return Detection(family, {ROLE: component}, None, sorted(k for k in sd if k in NON_WEIGHT_KEYS))
    return None


def dit_controlnet_arch(class_name: str | None) -> tuple[str, str] | None:
    """(family, architecture) of a diffusers ControlNet class of a DiT family; None for any other class."""
    return next(((family, arch) for name, family, arch in DIT_CONTROLNETS if name == class_name), None)
