"""ControlNet for Hunyuan-DiT (Tencent's v1.1 / v1.2 Canny, Depth, Pose ControlNets). Canonical = the release's
``.pt`` names (the DiT's plus ``before_proj`` and ``after_proj_list``); diffusers' HunyuanDiT2DControlNetModel is
converted. Not a family role: it is added to a loaded model (``models.add_controlnet``)."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict
from diffstudio.convert.hunyuan_dit_controlnet import hunyuan_controlnet_from_diffusers, hunyuan_controlnet_to_diffusers
from diffstudio.detect.hunyuan_dit_controlnet import (
    HUNYUAN_CONTROLNET_DIFFUSERS_SENTINELS,
    HUNYUAN_CONTROLNET_SENTINELS,
    derive_hunyuan_controlnet_config,
    hunyuan_controlnet_config_from_diffusers,
)
from diffstudio.models.hunyuan_dit import HunyuanDiTConfig
from diffstudio.models.hunyuan_dit_controlnet import HunyuanDiTControlNet

ARCH = ComponentArch(
    name="hunyuan_dit_controlnet",
    sentinels=HUNYUAN_CONTROLNET_SENTINELS,
    diffusers_sentinels=HUNYUAN_CONTROLNET_DIFFUSERS_SENTINELS,
    derive_config=derive_hunyuan_controlnet_config,
    config_from_diffusers=hunyuan_controlnet_config_from_diffusers,
    build=HunyuanDiTControlNet,
    from_diffusers=hunyuan_controlnet_from_diffusers,
    to_diffusers=hunyuan_controlnet_to_diffusers,
    config_to_dict=config_to_dict,
    config_from_dict=HunyuanDiTConfig.from_dict,
)
