"""Recognise a FLUX ControlNet (InstantX / diffusers ``FluxControlNetModel``) and derive its config.

Our layout (diffstudio.convert.flux_controlnet) keeps BFL's names for the shared trunk, so the trunk's
fields are read as a FLUX transformer's are (``detect.flux.trunk_fields``: hidden size and input width
from ``img_in``, heads from the QK-norm width, blocks counted, ``guidance_in`` present or not); besides:

    one residual Linear per block   ``controlnet_blocks.N`` / ``controlnet_single_blocks.N`` (counts must match)
    union modes                     rows of ``controlnet_mode_embedder.weight`` (absent: no modes)

A diffusers config.json (``_class_name: FluxControlNetModel``) gives the heads, the RoPE split and
``num_mode`` directly. What shapes cannot reveal (the RoPE split of a head that is not 128 wide) comes from
hints, e.g. the base transformer's config when the ControlNet is added to a loaded model.

XLabs' ControlNets (x-flux names) are told apart by their pixel-space hint encoder (``input_hint_block.N``,
cldm's tiny encoder at 16 channels) and ``pos_embed_input``; in diffusers' layout by ``input_hint_block.conv_in``
next to ``controlnet_x_embedder``. They are tried first, as InstantX's sentinels match them too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.detect.flux import config_from_diffusers, trunk_fields
from diffstudio.errors import UnknownModelError
from diffstudio.models.flux_controlnet import FluxControlNetConfig

FLUX_CONTROLNET_SENTINELS = (
    "controlnet_x_embedder.weight",
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
)
FLUX_CONTROLNET_DIFFUSERS_SENTINELS = (
    "controlnet_x_embedder.weight",
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
)
FAMILY = "flux"  # the family a FLUX ControlNet is added to

_OWN_BLOCK = re.compile(r"^(controlnet_blocks|controlnet_single_blocks)\.(\d+)\.")


def _own_block_counts(keys) -> tuple[int, int]:
    found: dict[str, set[int]] = {"controlnet_blocks": set(), "controlnet_single_blocks": set()}
    for k in keys:
        if m := _OWN_BLOCK.match(k):
            found[m.group(1)].add(int(m.group(2)))
    return len(found["controlnet_blocks"]), len(found["controlnet_single_blocks"])


def derive_flux_controlnet_config(sd: Mapping, hints: Mapping | None = None) -> FluxControlNetConfig:
    """Our-layout state dict (names and shapes only) -> FluxControlNetConfig. See the module docstring."""
    from diffstudio.convert.flux_controlnet import refuse_pixel_hints

    missing = [k for k in FLUX_CONTROLNET_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a FLUX ControlNet state dict in diffstudio's layout: missing {missing}")
    refuse_pixel_hints(sd)
    fields = trunk_fields(sd, hints)
    own = _own_block_counts(sd)
    if own != (fields["depth"], fields["depth_single_blocks"]):
        raise UnknownModelError(f"FLUX ControlNet with {own[0]} / {own[1]} residual Linears for {fields['depth']} "
                                f"double / {fields['depth_single_blocks']} single blocks: it needs one per block "
                                "(truncated file?)")
    modes = sd.get("controlnet_mode_embedder.weight")
    return FluxControlNetConfig(**fields, out_channels=fields["in_channels"],
                                num_modes=None if modes is None else int(modes.shape[0]),
                                extra_condition_channels=extra_condition_channels(sd, fields["in_channels"]))


def extra_condition_channels(sd: Mapping, in_channels: int) -> int:
    """What ``controlnet_x_embedder`` reads beyond the packed latent: 0, or alimama's inpainting ControlNets' packed
    mask (its input is 68 = 64 + 4 wide: 16 latent channels and one mask channel, 2x2-packed)."""
    extra = int(sd["controlnet_x_embedder.weight"].shape[1]) - in_channels
    if extra < 0:
        raise UnknownModelError(f"FLUX ControlNet controlnet_x_embedder reads {in_channels + extra} channels, fewer "
                                f"than its {in_channels}-wide latent input")
    return extra


def flux_controlnet_config_from_diffusers(config_json: Mapping) -> FluxControlNetConfig:
    """A diffusers ``FluxControlNetModel`` config.json dict -> FluxControlNetConfig."""
    cfg = dict(config_json)
    if cfg.get("conditioning_embedding_channels") is not None:
        raise UnknownModelError("this FluxControlNetModel encodes its control image in pixel space "
                                "(conditioning_embedding_channels); diffstudio's FLUX ControlNets read the control "
                                "image's VAE latent, as InstantX's do")
    trunk = config_from_diffusers(cfg).to_dict()
    trunk["out_channels"] = trunk["in_channels"]
    modes = cfg.get("num_mode")
    return FluxControlNetConfig(**trunk, num_modes=None if modes is None else int(modes),
                                extra_condition_channels=int(cfg.get("extra_condition_channels") or 0))


# -- XLabs ----------------------------------------------------------------------------------------------------

XLABS_SENTINELS = (
    "pos_embed_input.weight",
    "input_hint_block.0.weight",
    "img_in.weight",
    "time_in.in_layer.weight",
    "controlnet_blocks.0.weight",
)
XLABS_DIFFUSERS_SENTINELS = (
    "input_hint_block.conv_in.weight",
    "controlnet_x_embedder.weight",
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
)
_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)\.weight$")


def derive_xlabs_controlnet_config(sd: Mapping, hints: Mapping | None = None) -> FluxControlNetConfig:
    """x-flux-named state dict (names and shapes only) -> FluxControlNetConfig with ``hint_channels``."""
    from diffstudio.convert.flux_controlnet import XLABS_HINT_STAGES

    missing = [k for k in XLABS_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not an XLabs FLUX ControlNet state dict (x-flux names): missing {missing}")
    fields = trunk_fields(sd, hints)
    own = _own_block_counts(sd)
    if own != (fields["depth"], 0) or fields["depth_single_blocks"]:
        raise UnknownModelError(f"XLabs FLUX ControlNet with {own[0]} residual Linears for {fields['depth']} double "
                                f"blocks and {fields['depth_single_blocks']} single blocks: x-flux's have one per "
                                "double block and no single blocks (truncated file?)")
    convs = sorted(int(m.group(1)) for k in sd if (m := _HINT_CONV.match(k)))
    if convs != list(range(0, 4 * XLABS_HINT_STAGES, 2)):
        raise UnknownModelError(f"XLabs FLUX ControlNet hint encoder convs at {convs}: x-flux's has 8, at 0, 2 .. 14")
    out_channels = int(sd[f"input_hint_block.{convs[-1]}.weight"].shape[0])
    if 4 * out_channels != fields["in_channels"]:
        raise UnknownModelError(f"XLabs FLUX ControlNet hint encoder ends at {out_channels} channels: 2x2 patches "
                                f"of them must make its {fields['in_channels']}-wide input")
    return FluxControlNetConfig(**fields, out_channels=fields["in_channels"],
                                hint_channels=int(sd["input_hint_block.0.weight"].shape[1]))


def xlabs_config_from_diffusers(config_json: Mapping) -> FluxControlNetConfig:
    """A diffusers ``FluxControlNetModel`` config.json with ``conditioning_embedding_channels`` (XLabs' port)."""
    cfg = dict(config_json)
    # Its patch_size (2) is the hint's packing (the latent is packed outside the model, as for FLUX.1).
    trunk = config_from_diffusers({**cfg, "patch_size": 1}).to_dict()
    channels = cfg.get("conditioning_embedding_channels")
    if channels is None or 4 * int(channels) != trunk["in_channels"]:
        raise UnknownModelError(f"FluxControlNetModel with conditioning_embedding_channels={channels}: an XLabs "
                                f"ControlNet's hint encoder makes in_channels / 4 = {trunk['in_channels'] // 4}")
    trunk["out_channels"] = trunk["in_channels"]
    return FluxControlNetConfig(**trunk, hint_channels=3)  # diffusers' hint encoder reads RGB
