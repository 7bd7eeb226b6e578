# Training steps per second of every build stage at this process's thread count, on the real data of a
# finished build (docs/shapes.md, "Build time"), and the loss of each timed step, so that two thread
# counts can be compared bit for bit. Run it twice, e.g.:
#   OMP_NUM_THREADS=1 python experiments/shapes/stage_rates.py runs/shapes 80 one.json
#   OMP_NUM_THREADS=2 python experiments/shapes/stage_rates.py runs/shapes 80 two.json
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.models.unet import UNetModel
from diffstudio.models.vae import AutoencoderKL

workdir, steps, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
vae_cfg, unet_cfg, clip_cfg = B.demo_configs()
cached = torch.load(workdir / "latents.pt", weights_only=True)
images = torch.load(workdir / "dataset-20000-64-0.pt", weights_only=True)["images"]
named = B.tokenize_all(B.stage_captions(20000, 64, 0, always_position=True))
empty = B.tokenize_all([""])[0]
# the arguments of each stage in build.build (captions: the dataset's for unet, position captions after)
denoiser_stages = {"unet": (B.tokenize_all(B.stage_captions(20000, 64, 0)), dict(lr=1e-3)),
                   "layout": (named, dict(lr=5e-4, layout_t=700, warmup=50)),
                   "polish": (named, dict(lr=2e-4, warmup=20)),
                   "refine": (named, dict(lr=2e-4, lr_end=1e-5, warmup=20, snr_gamma=5.0, layout_t=700,
                                          layout_share=0.125))}
report = {"threads": torch.get_num_threads()}
with tempfile.TemporaryDirectory() as tmp:
    for name, (ids, kwargs) in denoiser_stages.items():
        torch.manual_seed(0)
        model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
        started = time.time()
        losses = B.train_denoiser(model, cached["latents"], ids, empty, steps=steps, batch=32,
                                  out_dir=Path(tmp) / name, seed=0, **kwargs)
        report[name] = {"steps_per_s": steps / (time.time() - started), "losses": losses}
    for name, decoder_only in (("vae", False), ("decoder", True)):
        torch.manual_seed(0)
        vae = AutoencoderKL(vae_cfg)
        if decoder_only:
            vae.load_state_dict(cached["vae"])
        started = time.time()
        losses = B.train_vae(vae, images, steps=steps, batch=8, out_dir=Path(tmp) / name, seed=0,
                             lr=1e-4 if decoder_only else 2e-4, decoder_only=decoder_only)
        report[name] = {"steps_per_s": steps / (time.time() - started), "losses": losses}
Path(out).write_text(json.dumps(report))
print({k: round(v["steps_per_s"], 2) for k, v in report.items() if k != "threads"}, report["threads"], "threads")
