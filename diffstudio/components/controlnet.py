"""ControlNet for the LDM UNet (SD 1.x, SDXL). Canonical = the cldm release's names (``control_model.``
stripped); diffusers' ControlNetModel is converted. Not a family role: it is added to a loaded model
(``models.add_controlnet``)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, dataclass_to_dict
from diffstudio.convert.controlnet import controlnet_from_diffusers, controlnet_to_diffusers
from diffstudio.detect.controlnet import (
    CONTROLNET_DIFFUSERS_SENTINELS,
    CONTROLNET_SENTINELS,
    controlnet_config_from_dict,
    controlnet_config_from_diffusers,
    derive_controlnet_config,
)
from diffstudio.models.controlnet import ControlNetModel

ARCH = ComponentArch(
    name="controlnet",
    sentinels=CONTROLNET_SENTINELS,
    diffusers_sentinels=CONTROLNET_DIFFUSERS_SENTINELS,
    derive_config=derive_controlnet_config,
    config_from_diffusers=controlnet_config_from_diffusers,
    build=ControlNetModel,
    from_diffusers=controlnet_from_diffusers,
    to_diffusers=controlnet_to_diffusers,
    config_to_dict=dataclass_to_dict,
    config_from_dict=controlnet_config_from_dict,
    kohya_layout="diffusers",
)
