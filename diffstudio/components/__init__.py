"""Component architectures: the kinds of weight blocks a checkpoint can hold.

Each architecture is one module of this package exporting ``ARCH``, its `ComponentArch` record, with real
references to its sentinel keys (``diffstudio.detect.<x>``), module (``diffstudio.models.<x>``) and
converters (``diffstudio.convert.<x>``). ``ARCHS`` maps each record's name to it; family records name
architectures by these names. Adding an architecture = one module here and one line below.
"""

from __future__ import annotations

from diffstudio.components import (
    bert,
    chatglm,
    clip_text,
    clip_vision,
    cogvideo_dit,
    cogvideox_vae,
    controlnet,
    exvideo_svd,
    flux_controlnet,
    flux_dit,
    flux_ip_adapter,
    hunyuan_dit,
    hunyuan_dit_controlnet,
    ip_adapter,
    ldm_unet,
    ldm_vae,
    mmdit,
    motion_module,
    sd3_controlnet,
    svd_unet,
    svd_vae,
    t5_encoder,
    xlabs_flux_controlnet,
)
from diffstudio.components.base import ComponentArch

ARCHS: dict[str, ComponentArch] = {module.ARCH.name: module.ARCH for module in (
    ldm_unet, ldm_vae, clip_text, chatglm, flux_dit, mmdit, t5_encoder, hunyuan_dit, bert, controlnet, motion_module,
    ip_adapter, svd_unet, exvideo_svd, svd_vae, clip_vision, cogvideo_dit, cogvideox_vae, flux_controlnet,
    xlabs_flux_controlnet, sd3_controlnet, flux_ip_adapter,
    hunyuan_dit_controlnet)}

__all__ = ["ARCHS", "ComponentArch"]
