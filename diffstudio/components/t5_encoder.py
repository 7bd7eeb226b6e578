"""T5 / mT5 encoders (SD3's and FLUX's T5-XXL, Hunyuan-DiT's mT5), a transformers T5EncoderModel.
Canonical = HF names with the embedding as ``shared.weight`` only; one layout, normalised always."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict, unchanged
from diffstudio.convert.t5 import build_t5_encoder, canonical_t5_keys
from diffstudio.detect.t5 import T5_SENTINELS, derive_t5_config, t5_config_from_json

ARCH = ComponentArch(
    name="t5_encoder",
    sentinels=T5_SENTINELS,
    diffusers_sentinels=T5_SENTINELS,
    derive_config=derive_t5_config,
    config_from_diffusers=t5_config_from_json,
    build=build_t5_encoder,
    from_diffusers=canonical_t5_keys,
    to_diffusers=unchanged,
    config_to_dict=config_to_dict,
    config_from_dict=t5_config_from_json,
    normalise_always=True,
)
