"""Kolors' text encoder (ChatGLM3-6B). Canonical = the released names; a bare ChatGLMModel's state dict
lacks the ``transformer.`` level, and the unused LM head and rotary buffer are dropped in every layout."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, dataclass_to_dict
from diffstudio.convert.chatglm import canonical_chatglm_keys, chatglm_to_released
from diffstudio.detect.chatglm import (
    CHATGLM_DIFFUSERS_SENTINELS,
    CHATGLM_SENTINELS,
    config_from_json,
    derive_chatglm_config,
)
from diffstudio.models.chatglm import ChatGLMConfig, ChatGLMEncoder

ARCH = ComponentArch(
    name="chatglm",
    sentinels=CHATGLM_SENTINELS,
    diffusers_sentinels=CHATGLM_DIFFUSERS_SENTINELS,
    derive_config=derive_chatglm_config,
    config_from_diffusers=config_from_json,
    build=ChatGLMEncoder,
    from_diffusers=canonical_chatglm_keys,
    to_diffusers=chatglm_to_released,
    config_to_dict=dataclass_to_dict,
    config_from_dict=ChatGLMConfig.from_dict,
    normalise_always=True,
)
