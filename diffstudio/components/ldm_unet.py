"""The LDM UNet (SD 1.x, SDXL, Kolors). Canonical = the LDM release's names (``model.diffusion_model.``
stripped); diffusers' UNet2DConditionModel is converted. Every family that uses it shares this record."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, dataclass_to_dict
from diffstudio.convert.unet import unet_from_diffusers, unet_to_diffusers
from diffstudio.detect.unet import UNET_DIFFUSERS_SENTINELS, UNET_SENTINELS, config_from_diffusers, derive_unet_config
from diffstudio.models.unet import UNetConfig, UNetModel

ARCH = ComponentArch(
    name="ldm_unet",
    sentinels=UNET_SENTINELS,
    diffusers_sentinels=UNET_DIFFUSERS_SENTINELS,
    derive_config=derive_unet_config,
    config_from_diffusers=config_from_diffusers,
    build=UNetModel,
    from_diffusers=unet_from_diffusers,
    to_diffusers=unet_to_diffusers,
    config_to_dict=dataclass_to_dict,
    config_from_dict=UNetConfig.from_dict,
    kohya_layout="diffusers",
)
