# The unet stage with the layout term from step 0 (docs/shapes.md, session 3).
# python experiments/shapes/variant.py WORKDIR SHARE [LR_END]
import json
import sys
import time
from pathlib import Path

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel

wd = Path(sys.argv[1])
share = float(sys.argv[2])
lr_end = float(sys.argv[3]) if len(sys.argv) > 3 else None
torch.manual_seed(0)
vae_cfg, unet_cfg, clip_cfg = B.demo_configs()
images, captions = torch.load(wd / "dataset-20000-64-0.pt", weights_only=True).values()
latents = torch.load(wd / "latents.pt", weights_only=True)["latents"]
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
t0 = time.time()
losses = B.train_denoiser(
    model,
    latents,
    B.tokenize_all(captions),
    B.tokenize_all([""])[0],
    steps=6000,
    batch=32,
    out_dir=wd / "unet",
    seed=0,
    layout_t=700,
    layout_share=share,
    lr_end=lr_end,
)
print(json.dumps({"minutes": (time.time() - t0) / 60, "loss": sum(losses[-100:]) / 100}))
