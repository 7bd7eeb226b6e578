"""AnimateDiff motion modules: an add-on to an LDM UNet (docs/animatediff.md). Canonical = the released
mm_*.ckpt names; diffusers' MotionAdapter layout is converted (``models.add_motion_module``)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.convert.motion import motion_from_diffusers, motion_to_diffusers
from diffstudio.detect.motion import (
    MOTION_DIFFUSERS_SENTINELS,
    MOTION_SENTINELS,
    config_from_diffusers,
    derive_motion_config,
)
from diffstudio.models.motion import MotionConfig, MotionModules

ARCH = ComponentArch(
    name="motion_module",
    sentinels=MOTION_SENTINELS,
    diffusers_sentinels=MOTION_DIFFUSERS_SENTINELS,
    derive_config=derive_motion_config,
    config_from_diffusers=config_from_diffusers,
    build=MotionModules,
    from_diffusers=motion_from_diffusers,
    to_diffusers=motion_to_diffusers,
    config_to_dict=lambda config: config.to_dict(),
    config_from_dict=MotionConfig.from_dict,
)
