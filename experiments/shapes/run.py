# One training run of the demo model's denoiser (docs/shapes.md, sessions 3 and 4).
# python experiments/shapes/run.py FROM WORKDIR STEPS LR LR_END SHARE SEED WARMUP [poscap] [allpos] [snr=G] [on=S]
#   FROM: "scratch" or a stage folder with a checkpoint (runs/shapes/unet); LR_END: a rate or "none";
#   SHARE: part of each batch on layout_loss (t >= 700); poscap: position captions for that part; allpos:
#   for the eps part too;
#   snr=G: Min-SNR-gamma weighting of the eps part; on=S: that share of the captions says "on a white
#   background" instead of ", white background" (both session 4).
import json
import sys
import time
from pathlib import Path

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel

start, wd = sys.argv[1], Path(sys.argv[2])
steps, lr, share, seed, warmup = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[6]), int(sys.argv[7]), int(
    sys.argv[8])
lr_end = None if sys.argv[5] == "none" else float(sys.argv[5])
_, unet_cfg, clip_cfg = B.demo_configs()
latents = torch.load(wd / "latents.pt", weights_only=True)["latents"]
torch.manual_seed(0)
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
if start != "scratch":
    model.load_state_dict(B._checkpoint_model(Path(start)))
options = sys.argv[9:]
snr_gamma = next((float(o[4:]) for o in options if o.startswith("snr=")), None)
on_background = next((float(o[3:]) for o in options if o.startswith("on=")), 0.0)
captions = B.stage_captions(20000, 64, 0, always_position="allpos" in options, on_background=on_background)
layout_captions = B.stage_captions(20000, 64, 0, always_position=True, on_background=on_background)
# None: the layout part reads the eps part's captions (no second tokenization when they are the same)
layout_ids = B.tokenize_all(layout_captions) if "poscap" in options and layout_captions != captions else None
t0 = time.time()
losses = B.train_denoiser(model, latents, B.tokenize_all(captions), B.tokenize_all([""])[0], steps=steps, batch=32,
                          out_dir=wd / "unet", seed=seed, lr=lr, lr_end=lr_end, warmup=warmup, layout_t=700,
                          layout_share=share, layout_ids=layout_ids,
                          snr_gamma=snr_gamma)
print(json.dumps({"minutes": (time.time() - t0) / 60, "loss": sum(losses[-100:]) / 100}))
