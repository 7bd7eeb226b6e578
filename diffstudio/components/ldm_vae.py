"""The LDM AutoencoderKL (SD 1.x, SDXL, SD3, FLUX, ...). Canonical = the LDM release's names
(``first_stage_model.`` stripped); diffusers' AutoencoderKL is converted."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.convert.vae import vae_from_diffusers, vae_to_diffusers
from diffstudio.detect.vae import VAE_DIFFUSERS_SENTINELS, VAE_SENTINELS, config_from_diffusers, derive_vae_config
from diffstudio.models.vae import AutoencoderKL, VAEConfig

ARCH = ComponentArch(
    name="ldm_vae",
    sentinels=VAE_SENTINELS,
    diffusers_sentinels=VAE_DIFFUSERS_SENTINELS,
    derive_config=derive_vae_config,
    config_from_diffusers=config_from_diffusers,
    build=AutoencoderKL,
    from_diffusers=vae_from_diffusers,
    to_diffusers=vae_to_diffusers,
    config_to_dict=VAEConfig.to_dict,
    config_from_dict=VAEConfig.from_dict,
)
