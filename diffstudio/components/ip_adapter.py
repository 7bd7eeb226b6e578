"""IP-Adapter (image prompts) for the LDM UNet: an add-on to a loaded model (``models.add_ip_adapter``).
Canonical = the released files' names (``image_proj.*``, ``ip_adapter.*``); there is no other layout."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.detect.ipadapter import IP_ADAPTER_SENTINELS, derive_ip_adapter_config, ip_adapter_config_from_dict
from diffstudio.models.ipadapter import IPAdapter


def _same_layout(sd, config=None) -> dict:
    return dict(sd)


ARCH = ComponentArch(
    name="ip_adapter",
    sentinels=IP_ADAPTER_SENTINELS,
    diffusers_sentinels=IP_ADAPTER_SENTINELS,
    derive_config=derive_ip_adapter_config,
    config_from_diffusers=ip_adapter_config_from_dict,
    build=IPAdapter,
    from_diffusers=_same_layout,
    to_diffusers=_same_layout,
    config_to_dict=lambda config: config.to_dict(),
    config_from_dict=ip_adapter_config_from_dict,
)
