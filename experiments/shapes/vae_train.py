# One VAE-stage variant (build.train_vae from the build's initial weights, or resumed from a copied stage folder),
# then how its reconstructions read (vae_recon.kinds_kept) and the dataset's share of edge pixels (docs/shapes.md,
# "Session 7": the lr 1e-3 row and the resumed 4500-step row; the edge-weighted VAE stage is build10's own).
# python experiments/shapes/vae_train.py OUT_DIR STEPS [LR] [EDGE_WEIGHT] [DATASET_CACHE]
#   resume build8's VAE stage to 4500 steps: cp -r runs/build8/vae runs/vexp_long; ... vae_train.py runs/vexp_long 4500
import sys
from pathlib import Path

import torch
from vae_recon import kinds_kept

from diffstudio.demo import build as B
from diffstudio.models.vae import AutoencoderKL
from diffstudio.train.objectives import edge_map

out, steps = Path(sys.argv[1]), int(sys.argv[2])
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-4
edge_weight = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
images = torch.load(sys.argv[5] if len(sys.argv) > 5 else "runs/build8/dataset-20000-64-0.pt",
                    weights_only=True)["images"]
print("edge pixels", edge_map(B.to_unit(images[:512])).mean().item())
torch.manual_seed(0)  # build()'s seed before the VAE stage: the same initial weights
vae_cfg = B.demo_configs()[0]
vae = AutoencoderKL(vae_cfg)
with torch.no_grad():
    vae.quant_conv.bias[vae_cfg.latent_channels:] = -8.0  # as build's VAE stage
losses = B.train_vae(vae, images, steps=steps, batch=8, out_dir=out, seed=0, lr=lr, optimizer="adamw_fused",
                     edge_weight=edge_weight)
if losses:  # (none when the copied stage is already at STEPS: then this only scores it)
    print("loss (last 50)", sum(losses[-50:]) / len(losses[-50:]))
print(out, steps, {kind: f"{k}/{t}" for kind, (k, t) in kinds_kept(vae.eval()).items()})
