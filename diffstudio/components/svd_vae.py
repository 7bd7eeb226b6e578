"""The SVD autoencoder (image encoder + temporal decoder). Canonical = the release's names (``first_stage_model.``
of svd.safetensors stripped); diffusers' AutoencoderKLTemporalDecoder is converted."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.convert.svd_vae import temporal_vae_from_diffusers, temporal_vae_to_diffusers
from diffstudio.detect.svd_vae import (
    TEMPORAL_VAE_DIFFUSERS_SENTINELS,
    TEMPORAL_VAE_SENTINELS,
    config_from_diffusers,
    derive_temporal_vae_config,
)
from diffstudio.models.svd_vae import TemporalAutoencoderKL, TemporalVAEConfig

ARCH = ComponentArch(
    name="svd_vae",
    sentinels=TEMPORAL_VAE_SENTINELS,
    diffusers_sentinels=TEMPORAL_VAE_DIFFUSERS_SENTINELS,
    derive_config=derive_temporal_vae_config,
    config_from_diffusers=config_from_diffusers,
    build=TemporalAutoencoderKL,
    from_diffusers=temporal_vae_from_diffusers,
    to_diffusers=temporal_vae_to_diffusers,
    config_to_dict=TemporalVAEConfig.to_dict,
    config_from_dict=TemporalVAEConfig.from_dict,
)
