"""The CogVideoX expert transformer (2B, 5B, 5B-I2V, 1.5). Canonical = diffusers' CogVideoXTransformer3DModel
names, which the released folders and single-file transformer weights use: one layout."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, unchanged
from diffstudio.detect.cogvideo import COGVIDEO_SENTINELS, config_from_diffusers, derive_cogvideo_config
from diffstudio.models.cogvideo import CogVideoConfig, CogVideoTransformer


def _same_layout(sd) -> dict:
    return dict(sd)


ARCH = ComponentArch(
    name="cogvideo_dit",
    sentinels=COGVIDEO_SENTINELS,
    diffusers_sentinels=COGVIDEO_SENTINELS,
    derive_config=derive_cogvideo_config,
    config_from_diffusers=config_from_diffusers,
    build=CogVideoTransformer,
    from_diffusers=_same_layout,
    to_diffusers=unchanged,
    config_to_dict=CogVideoConfig.to_dict,
    config_from_dict=CogVideoConfig.from_dict,
)
