"""ControlNet for the SD3 / SD3.5 MMDiT (InstantX's SD3 ControlNets, Stability's SD3.5 ones). Canonical = the
MMDiT's original names plus ``pos_embed_input`` and ``controlnet_blocks``; diffusers' SD3ControlNetModel (and
Stability's SD3.5 files) are converted. Not a family role: it is added to a loaded model (``models.add_controlnet``)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.sd3_controlnet import sd3_controlnet_from_diffusers, sd3_controlnet_to_diffusers
from diffstudio.detect.sd3_controlnet import (
    SD3_CONTROLNET_DIFFUSERS_SENTINELS,
    SD3_CONTROLNET_SENTINELS,
    derive_sd3_controlnet_config,
    sd3_controlnet_config_from_diffusers,
)
from diffstudio.models.sd3_controlnet import SD3ControlNet, SD3ControlNetConfig

ARCH = ComponentArch(
    name="sd3_controlnet",
    sentinels=SD3_CONTROLNET_SENTINELS,
    diffusers_sentinels=SD3_CONTROLNET_DIFFUSERS_SENTINELS,
    derive_config=derive_sd3_controlnet_config,
    config_from_diffusers=sd3_controlnet_config_from_diffusers,
    build=SD3ControlNet,
    from_diffusers=sd3_controlnet_from_diffusers,
    to_diffusers=sd3_controlnet_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=SD3ControlNetConfig.from_dict,
)
