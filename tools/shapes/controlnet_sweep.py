"""Which recipe trains the Shapes ControlNet within the build's budget? (docs/controlnet.md, "The Shapes ControlNet")

    python tools/shapes/controlnet_sweep.py DATA_FOLDER OUT_JSON [--device cuda] [--only NAME ...]

Each run is one `train_controlnet` call on the packaged demo model (the build's, with other step counts, batch
sizes and rates), paused at its evaluation steps; each pause scores the checkpoint with the build's two checks
(`controlnet_build.CHECKS`, 12 seeds each). Runs share one cache of latents and captions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

RUNS = {  # name: (batch, steps, lr, lr_end, evaluation steps)
    "b32-lr5e-4": (32, 1200, 5e-4, 5e-5, (400, 800, 1200)),
    "b32-lr1e-3": (32, 1200, 1e-3, 5e-5, (400, 800, 1200)),
    "b16-lr5e-4": (16, 2400, 5e-4, 5e-5, (800, 1600, 2400)),
    "b32-lr2e-4-const": (32, 1200, 2e-4, None, (600, 1200)),
}


def checkpoint_controlnet(models, workdir: Path):
    from diffstudio.train.controlnet import controlnet_from_unet

    controlnet = controlnet_from_unet(models.unet).to(models.device)
    state = torch.load(workdir / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]
    controlnet.load_state_dict(state)
    return controlnet.eval()


def main() -> None:
    import diffstudio
    from diffstudio.demo.controlnet_build import CHECKS, score_outline
    from diffstudio.train.controlnet import ControlNetTrainConfig, train_controlnet

    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--workdir", default="runs/controlnet-sweep")
    args = parser.parse_args()
    models = diffstudio.load(device=args.device)
    results = {"baseline": {name: score_outline(models, None, scene, prompt) for name, (scene, prompt) in
                            CHECKS.items()}}
    print(json.dumps(results), flush=True)
    shared_cache = None
    for name, (batch, steps, lr, lr_end, evals) in RUNS.items():
        if args.only and name not in args.only:
            continue
        workdir = Path(args.workdir) / name
        if shared_cache is not None and not (workdir / "cache.pt").exists():
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_cache, workdir / "cache.pt")
        config = ControlNetTrainConfig(data=args.data, out=str(workdir / "cn.safetensors"), steps=steps,
                                       batch_size=batch, lr=lr, lr_end=lr_end, warmup=50, resolution=64,
                                       buckets=False, caption_dropout=0.1, optimizer="adamw_fused",
                                       checkpoint_every=100, workdir=str(workdir), save_dtype="fp16")
        done = 0
        started = time.time()
        for at in evals:
            train_controlnet(config, models, stop_after=at - done)
            done = at
            shared_cache = shared_cache or workdir / "cache.pt"
            controlnet = checkpoint_controlnet(models, workdir)
            scores = {check: score_outline(models, controlnet, scene, prompt)
                      for check, (scene, prompt) in CHECKS.items()}
            results[f"{name}@{at}"] = {**scores, "train_seconds": round(time.time() - started, 1)}
            print(json.dumps({f"{name}@{at}": results[f"{name}@{at}"]}), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
