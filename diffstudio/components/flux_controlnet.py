"""The FLUX.1 ControlNet of InstantX (union included). Canonical = BFL's names for the shared trunk and the
release's names for the ControlNet's own layers; diffusers' FluxControlNetModel is converted. Not a family
role: it is added to a loaded FLUX model (``models.add_controlnet``). XLabs': xlabs_flux_controlnet.py."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.flux_controlnet import flux_controlnet_from_diffusers, flux_controlnet_to_diffusers
from diffstudio.detect.flux_controlnet import (
    FLUX_CONTROLNET_DIFFUSERS_SENTINELS,
    FLUX_CONTROLNET_SENTINELS,
    derive_flux_controlnet_config,
    flux_controlnet_config_from_diffusers,
)
from diffstudio.models.flux_controlnet import FluxControlNet, FluxControlNetConfig

ARCH = ComponentArch(
    name="flux_controlnet",
    sentinels=FLUX_CONTROLNET_SENTINELS,
    diffusers_sentinels=FLUX_CONTROLNET_DIFFUSERS_SENTINELS,
    derive_config=derive_flux_controlnet_config,
    config_from_diffusers=flux_controlnet_config_from_diffusers,
    build=FluxControlNet,
    from_diffusers=flux_controlnet_from_diffusers,
    to_diffusers=flux_controlnet_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=FluxControlNetConfig.from_dict,
)
