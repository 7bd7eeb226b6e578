"""The SD3 / SD3.5 MMDiT. Canonical = the original release's names (sd3_medium.safetensors, under
``model.diffusion_model.``); diffusers' SD3Transformer2DModel is converted."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.mmdit import mmdit_from_diffusers, mmdit_to_diffusers
from diffstudio.detect.mmdit import (
    MMDIT_DIFFUSERS_SENTINELS,
    MMDIT_SENTINELS,
    config_from_diffusers,
    derive_mmdit_config,
)
from diffstudio.models.mmdit import MMDiT, MMDiTConfig

ARCH = ComponentArch(
    name="mmdit",
    sentinels=MMDIT_SENTINELS,
    diffusers_sentinels=MMDIT_DIFFUSERS_SENTINELS,
    derive_config=derive_mmdit_config,
    config_from_diffusers=config_from_diffusers,
    build=MMDiT,
    from_diffusers=mmdit_from_diffusers,
    to_diffusers=mmdit_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=MMDiTConfig.from_dict,
)
