"""Hunyuan-DiT v1.0-v1.2. Canonical = the released t2i/model/pytorch_model_*.pt names; diffusers'
HunyuanDiT2DModel is converted."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers, hunyuan_dit_to_diffusers
from diffstudio.detect.hunyuan_dit import (
    HUNYUAN_DIT_DIFFUSERS_SENTINELS,
    HUNYUAN_DIT_SENTINELS,
    config_from_diffusers,
    derive_hunyuan_dit_config,
)
from diffstudio.models.hunyuan_dit import HunyuanDiT, HunyuanDiTConfig

ARCH = ComponentArch(
    name="hunyuan_dit",
    sentinels=HUNYUAN_DIT_SENTINELS,
    diffusers_sentinels=HUNYUAN_DIT_DIFFUSERS_SENTINELS,
    derive_config=derive_hunyuan_dit_config,
    config_from_diffusers=config_from_diffusers,
    build=HunyuanDiT,
    from_diffusers=hunyuan_dit_from_diffusers,
    to_diffusers=hunyuan_dit_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=HunyuanDiTConfig.from_dict,
)
