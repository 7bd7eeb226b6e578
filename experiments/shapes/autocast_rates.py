# Training steps per second of the demo model's UNet (+ text encoder) and VAE at this process's thread count,
# fp32 against bf16 autocast (the CPU's AVX512-BF16 path), on random data of the build's batch shapes
# (docs/shapes.md, "Session 5"): is bf16 a lever on the build time?
#   python experiments/shapes/autocast_rates.py [STEPS]
import sys
import time

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel
from diffstudio.models.vae import AutoencoderKL

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
vae_cfg, unet_cfg, clip_cfg = B.demo_configs()
torch.manual_seed(0)
denoiser = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
vae = AutoencoderKL(vae_cfg)
latents, t, ids = torch.randn(32, 4, 8, 8), torch.randint(0, 1000, (32,)), torch.randint(0, 49407, (32, 77))
images = torch.rand(8, 3, 64, 64) * 2 - 1


def unet_step():
    return (denoiser(latents, t, ids) - latents).square().mean()


def vae_step():
    return (vae.decode(vae.encode(images)) - images).abs().mean()


for name, model, step in (("unet", denoiser, unet_step), ("vae", vae, vae_step)):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for dtype in (None, torch.bfloat16):
        for i in range(steps + 3):  # three warm-up steps
            if i == 3:
                started = time.time()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = step()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{name} {'bf16 autocast' if dtype else 'fp32'}: {steps / (time.time() - started):.2f} steps/s",
              flush=True)
