"""Components a plan needs that the files given do not hold: the released ones a user will add.

A FLUX or SD3 single file often holds the denoiser alone (``flux1-dev.safetensors``); the text encoders and the
VAE come as other files at load time. The planner then counts them at their released configs, and says so.
"""

from __future__ import annotations

import torch

from diffstudio.detect import Component

# transformers config fields of the released text encoders (facts from their config.json files)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def _clip_config(width: int):
    from transformers import CLIPTextConfig

    from diffstudio.release_configs import CLIP_G, CLIP_L

    return CLIPTextConfig(**(CLIP_G if width == 1280 else CLIP_L))


def _config(role, family):
    if role.arch == "clip_text":
        return _clip_config(role.width or 768)
    if role.arch == "t5_encoder":
        from transformers import T5Config

        return T5Config(**T5_XXL)
    if role.arch == "ldm_vae":
        from diffstudio.models.vae import VAEConfig

        return VAEConfig(latent_channels=family.latent.channels)
    return None


_CACHE: dict = {}


def assumed_component(role, family) -> Component | None:
    """``role`` of ``family`` at its released config (parameters counted on the meta device), or None when
    there is no released config to assume (the planner then names the component as missing)."""
    from diffstudio.components import ARCHS

    key = (role.name, role.arch, role.width, family.latent.channels)
    if key not in _CACHE:
        config = _config(role, family)
        if config is None:
            return None
        with torch.device("meta"):
            module = ARCHS[role.arch].build(config)
        params = sum(p.numel() for p in module.parameters())
        _CACHE[key] = Component(role.name, role.arch, "(assumed)", "released", config, params, "-")
    return _CACHE[key]
