"""The FLUX.1 transformer (dev / schnell). Canonical = BFL's names (flux1-dev.safetensors, bare keys);
diffusers' FluxTransformer2DModel is converted."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.flux import flux_from_diffusers, flux_to_diffusers
from diffstudio.detect.flux import FLUX_DIFFUSERS_SENTINELS, FLUX_SENTINELS, config_from_diffusers, derive_flux_config
from diffstudio.models.flux import FluxConfig, FluxTransformer

ARCH = ComponentArch(
    name="flux_dit",
    sentinels=FLUX_SENTINELS,
    diffusers_sentinels=FLUX_DIFFUSERS_SENTINELS,
    derive_config=derive_flux_config,
    config_from_diffusers=config_from_diffusers,
    build=FluxTransformer,
    from_diffusers=flux_from_diffusers,
    to_diffusers=flux_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=FluxConfig.from_dict,
)
