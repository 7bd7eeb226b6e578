"""CLIP image encoders, a transformers CLIPVisionModelWithProjection (SVD's conditioning, IP-Adapter's encoders).
Canonical = the transformers layout; the other layout in single files is OpenCLIP's ``visual.*`` tower."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.clip_vision import build_vision_model, to_canonical_vision, vision_to_openclip
from diffstudio.detect.clip_vision import (
    OPENCLIP_VISION_SENTINELS,
    VISION_SENTINELS,
    derive_vision_config,
    vision_config_from_dict,
)

ARCH = ComponentArch(
    name="clip_vision",
    sentinels=VISION_SENTINELS,
    diffusers_sentinels=OPENCLIP_VISION_SENTINELS,
    derive_config=derive_vision_config,
    config_from_diffusers=vision_config_from_dict,
    build=build_vision_model,
    from_diffusers=to_canonical_vision,
    to_diffusers=lambda sd, config=None: vision_to_openclip(sd),
    config_to_dict=config_to_dict,
    config_from_dict=vision_config_from_dict,
    normalise_always=True,
    other_layout="openclip",
)
