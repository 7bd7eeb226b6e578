# One AdamW step of the demo denoiser (UNet + text encoder, 10.5 M parameters) with torch's per-tensor loop
# against its fused kernel, at this process's thread count (the figure behind train(optimizer="adamw_fused")).
#   python tools/shapes/adamw_step.py
import time

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel

_, unet_cfg, clip_cfg = B.demo_configs()
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
for p in model.parameters():
    p.grad = torch.randn_like(p)
for name, kwargs in (("per-tensor", {}), ("fused", {"fused": True})):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **kwargs)
    opt.step()  # the first step allocates the moments
    started = time.time()
    for _ in range(30):
        opt.step()
    print(f"AdamW step, {name}: {(time.time() - started) / 30 * 1000:.1f} ms")
