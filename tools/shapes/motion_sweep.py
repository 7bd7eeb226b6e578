"""Shapes motion module: train variants of the build side by side and score each (motion_eval.evaluate_motion).

    python tools/shapes/motion_sweep.py OUT_DIR --clips 1000 --variant base --variant model:schedule=model ...

A variant is NAME[:key=value,...] over build_motion's arguments (steps, batch_size, lr, lr_end, warmup,
schedule). Each trains in OUT_DIR/NAME (sharing OUT_DIR/data) in its own process, then scores 12 seeds of
"a red circle moving to the right"; results go to OUT_DIR/NAME.json as each finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = None if value == "none" else value if key == "schedule" else float(value) \
            if "." in value or "e" in value else int(value)
    return name, kwargs


def run_one(out_dir: Path, name: str, kwargs: dict, clips: int, seeds: int) -> None:
    import torch

    import diffstudio
    from diffstudio.demo.motion_build import BUILD_DEFAULTS
    from diffstudio.demo.motion_eval import evaluate_motion
    from diffstudio.motion_loading import add_motion_module
    from diffstudio.train.motion import MotionTrainConfig, train_motion

    settings = {**{k: BUILD_DEFAULTS[k] for k in ("steps", "batch_size", "lr", "lr_end", "warmup", "schedule")},
                **kwargs}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = diffstudio.load(device=device)
    started = time.time()
    config = MotionTrainConfig(data=str(out_dir / "data"), out=str(out_dir / f"{name}.safetensors"), frames=16,
                               optimizer="adamw_fused", workdir=str(out_dir / name), checkpoint_every=100000,
                               **settings)
    path = train_motion(config, models) if settings["steps"] else None
    minutes = (time.time() - started) / 60
    motion = add_motion_module(models, path) if path else None
    result = evaluate_motion(models, motion, seeds=range(seeds), schedule=settings["schedule"])
    result.update(name=name, settings=settings, train_minutes=round(minutes, 2))
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(name, {k: result[k] for k in ("ok", "monotonic", "found_mean", "train_minutes")}, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    if args.one:
        name, kwargs = parse_variant(args.one)
        run_one(out_dir, name, kwargs, args.clips, args.seeds)
        return
    from diffstudio.demo.motion_build import write_motion_dataset

    write_motion_dataset(out_dir / "data", args.clips)
    procs = [subprocess.Popen([sys.executable, __file__, str(out_dir), "--clips", str(args.clips), "--seeds",
                               str(args.seeds), "--one", v]) for v in args.variant]
    for p in procs:
        p.wait()


if __name__ == "__main__":
    main()
