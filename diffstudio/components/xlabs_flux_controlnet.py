"""XLabs' FLUX.1 ControlNets (x-flux ``ControlNetFlux``: ``flux-canny-controlnet-v3.safetensors`` ...).
Canonical = x-flux's names (BFL's for the trunk, ``pos_embed_input``, cldm's ``input_hint_block.N``);
diffusers' FluxControlNetModel with ``conditioning_embedding_channels`` (XLabs' diffusers ports) is converted.
Added to a loaded FLUX model (``models.add_controlnet``)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.flux_controlnet import xlabs_controlnet_from_diffusers, xlabs_controlnet_to_diffusers
from diffstudio.detect.flux_controlnet import (
    XLABS_DIFFUSERS_SENTINELS,
    XLABS_SENTINELS,
    derive_xlabs_controlnet_config,
    xlabs_config_from_diffusers,
)
from diffstudio.models.flux_controlnet import FluxControlNetConfig, XLabsFluxControlNet

ARCH = ComponentArch(
    name="xlabs_flux_controlnet",
    sentinels=XLABS_SENTINELS,
    diffusers_sentinels=XLABS_DIFFUSERS_SENTINELS,
    derive_config=derive_xlabs_controlnet_config,
    config_from_diffusers=xlabs_config_from_diffusers,
    build=XLabsFluxControlNet,
    from_diffusers=xlabs_controlnet_from_diffusers,
    to_diffusers=xlabs_controlnet_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=FluxControlNetConfig.from_dict,
)
