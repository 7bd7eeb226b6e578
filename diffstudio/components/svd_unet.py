"""The Stable Video Diffusion spatio-temporal UNet (SVD, SVD-XT, 1.1). Canonical = generative-models' release
names (``model.diffusion_model.`` stripped); diffusers' UNetSpatioTemporalConditionModel is converted. The frame
count a checkpoint was trained for (14 / 25) is not in its weights: it comes from hints or a stored config."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, dataclass_to_dict
from diffstudio.convert.svd_unet import svd_unet_from_diffusers, svd_unet_to_diffusers
from diffstudio.detect.svd_unet import (
    SVD_UNET_DIFFUSERS_SENTINELS,
    SVD_UNET_SENTINELS,
    config_from_diffusers,
    derive_svd_unet_config,
)
from diffstudio.models.svd_unet import SVDUNet, SVDUNetConfig

ARCH = ComponentArch(
    name="svd_unet",
    sentinels=SVD_UNET_SENTINELS,
    diffusers_sentinels=SVD_UNET_DIFFUSERS_SENTINELS,
    derive_config=derive_svd_unet_config,
    config_from_diffusers=config_from_diffusers,
    build=SVDUNet,
    from_diffusers=svd_unet_from_diffusers,
    to_diffusers=svd_unet_to_diffusers,
    config_to_dict=dataclass_to_dict,
    config_from_dict=SVDUNetConfig.from_dict,
)
