"""The demo architecture with seeded random weights: what `diffstudio.load()` returns when the
packaged shapes-sd weights file is missing (docs/shapes.md). It runs every SD 1.x code path; its
pictures are noise, not shapes."""

from __future__ import annotations

import torch

# CFG 3, not SD's 7: from 5 up the guided denoiser over-corrects colour so strongly that DPM++ 2M SDE oscillates
# (docs/shapes.md, "Guidance").
DEMO_DEFAULTS = {"width": 64, "height": 64, "steps": 20, "cfg_scale": 3.0}


def untrained_demo_models(seed: int = 0):
    from diffstudio.conditioning.tokenizers import load_clip_tokenizer
    from diffstudio.convert.clip import build_clip_text_model
    from diffstudio.demo.build import demo_configs
    from diffstudio.families.sd15 import SD15
    from diffstudio.loader import Models
    from diffstudio.models.unet import UNetModel
    from diffstudio.models.vae import AutoencoderKL

    vae_cfg, unet_cfg, clip_cfg = demo_configs()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        components = {"unet": UNetModel(unet_cfg), "vae": AutoencoderKL(vae_cfg),
                      "text_encoder": build_clip_text_model(clip_cfg)}
    finally:
        torch.random.set_rng_state(state)
    for module in components.values():
        module.eval().requires_grad_(False)
    components["tokenizer"] = load_clip_tokenizer()
    return Models(SD15, components, {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": clip_cfg},
                  {"unet": "untrained-demo"}, defaults=DEMO_DEFAULTS)
