# Continue a stage checkpoint with an annealed learning rate (docs/shapes.md, session 3).
# python experiments/shapes/continue.py FROM_STAGE_DIR TO_WORKDIR STEPS LR LR_END SHARE [poscap]
import json
import sys
import time
from pathlib import Path

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel

src, wd = Path(sys.argv[1]), Path(sys.argv[2])
steps, lr, lr_end, share = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
vae_cfg, unet_cfg, clip_cfg = B.demo_configs()
images, captions = torch.load(wd / "dataset-20000-64-0.pt", weights_only=True).values()
latents = torch.load(wd / "latents.pt", weights_only=True)["latents"]
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
model.load_state_dict(B._checkpoint_model(src))
t0 = time.time()
losses = B.train_denoiser(
    model,
    latents,
    B.tokenize_all(captions),
    B.tokenize_all([""])[0],
    steps=steps,
    batch=32,
    out_dir=wd / "unet",
    seed=2,
    lr=lr,
    lr_end=lr_end,
    warmup=50,
    layout_t=700,
    layout_share=share,
    layout_ids=B.tokenize_all(B.position_captions(20000, 64, 0)) if len(sys.argv) > 7 else None,
)
print(json.dumps({"minutes": (time.time() - t0) / 60, "loss": sum(losses[-100:]) / 100}))
