"""The CogVideoX expert transformer (2B, 5B, 5B-I2V, 1.5). Canonical = diffusers' CogVideoXTransformer3DModel
names, which the released folders and single-file transformer weights use. The other layout is DiffSynth-Studio's
``CogDiT`` (files and LoRAs trained there, e.g. ExVideo-CogVideoX)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.convert.cogvideo import cogvideo_from_diffsynth, cogvideo_to_diffsynth
from diffstudio.detect.cogvideo import (
    COGVIDEO_DIFFSYNTH_SENTINELS,
    COGVIDEO_SENTINELS,
    config_from_diffusers,
    derive_cogvideo_config,
)
from diffstudio.models.cogvideo import CogVideoConfig, CogVideoTransformer

ARCH = ComponentArch(
    name="cogvideo_dit",
    sentinels=COGVIDEO_SENTINELS,
    diffusers_sentinels=COGVIDEO_DIFFSYNTH_SENTINELS,
    derive_config=derive_cogvideo_config,
    config_from_diffusers=config_from_diffusers,
    build=CogVideoTransformer,
    from_diffusers=cogvideo_from_diffsynth,
    to_diffusers=cogvideo_to_diffsynth,
    config_to_dict=CogVideoConfig.to_dict,
    config_from_dict=CogVideoConfig.from_dict,
    other_layout="diffsynth",
)
