"""XLabs' IP-Adapter for FLUX.1 (models/flux_ipadapter.py): an add-on to a loaded FLUX model
(``models.add_ip_adapter``). Canonical = XLabs' names (``ip_adapter_proj_model.*``,
``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*``); there is no other layout."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch
from diffstudio.detect.ipadapter import (
    FLUX_IP_ADAPTER_SENTINELS,
    derive_flux_ip_adapter_config,
    ip_adapter_config_from_dict,
)
from diffstudio.models.flux_ipadapter import FluxIPAdapter


def _same_layout(sd, config=None) -> dict:
    return dict(sd)


ARCH = ComponentArch(
    name="flux_ip_adapter",
    sentinels=FLUX_IP_ADAPTER_SENTINELS,
    diffusers_sentinels=FLUX_IP_ADAPTER_SENTINELS,
    derive_config=derive_flux_ip_adapter_config,
    config_from_diffusers=ip_adapter_config_from_dict,
    build=FluxIPAdapter,
    from_diffusers=_same_layout,
    to_diffusers=_same_layout,
    config_to_dict=lambda config: config.to_dict(),
    config_from_dict=ip_adapter_config_from_dict,
)
