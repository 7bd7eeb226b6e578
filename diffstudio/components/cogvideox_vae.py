"""The CogVideoX causal 3D VAE (CogVideoX-2b / -5b / -5b-I2V). Canonical = diffusers' AutoencoderKLCogVideoX
names, the layout of the released ``vae/`` folders; there is no other layout to convert."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.detect.cogvideo_vae import (
    COGVIDEOX_VAE_SENTINELS,
    config_from_diffusers,
    derive_cogvideox_vae_config,
)
from diffstudio.models.cogvideo_vae import AutoencoderKLCogVideoX, CogVideoXVAEConfig


def _same_layout(sd, config=None) -> dict:
    return dict(sd)


ARCH = ComponentArch(
    name="cogvideox_vae",
    sentinels=COGVIDEOX_VAE_SENTINELS,
    diffusers_sentinels=COGVIDEOX_VAE_SENTINELS,
    derive_config=derive_cogvideox_vae_config,
    config_from_diffusers=config_from_diffusers,
    build=AutoencoderKLCogVideoX,
    from_diffusers=_same_layout,
    to_diffusers=_same_layout,
    config_to_dict=CogVideoXVAEConfig.to_dict,
    config_from_dict=CogVideoXVAEConfig.from_dict,
)
