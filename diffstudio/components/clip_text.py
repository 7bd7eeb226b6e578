"""CLIP text encoders, a transformers CLIPTextModel(WithProjection). Canonical = the transformers layout;
the "other" layout in single files is OpenCLIP's (SD 2.x, SDXL's bigG)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict, unchanged
from diffstudio.convert.clip import build_clip_text_model, canonical_clip_keys
from diffstudio.detect.clip import CLIP_SENTINELS, OPENCLIP_SENTINELS, clip_config_from_dict, derive_clip_config

ARCH = ComponentArch(
    name="clip_text",
    sentinels=CLIP_SENTINELS,
    diffusers_sentinels=OPENCLIP_SENTINELS,
    derive_config=derive_clip_config,
    config_from_diffusers=clip_config_from_dict,
    build=build_clip_text_model,
    from_diffusers=canonical_clip_keys,
    to_diffusers=unchanged,
    config_to_dict=config_to_dict,
    config_from_dict=clip_config_from_dict,
    normalise_always=True,
    other_layout="openclip",
)
