"""Train the Shapes motion module ("shapes-motion") for the packaged demo model, with ``train.motion``.

    python -m diffstudio.demo motion --workdir runs/shapes-motion \
        --out diffstudio/demo/weights/shapes-motion.safetensors

1. Write the clips: one shape moving in a straight line at constant speed from one side of the picture to
   the other (``motion_clip``), as folders of PNG frames with a ``metadata.csv``, captioned
   "a red circle moving to the right" (half of them with ", white background").
2. ``train_motion`` on the packaged demo model (64 x 64, latent 8 x 8), 16 frames per clip, AnimateDiff's linear
   schedule; the work folder holds the cache and the checkpoints, and a killed build resumes.
3. Score the file: ``motion_eval.evaluate_motion`` on "a red circle moving to the right" (docs/animatediff.md).
"""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import numpy as np

from diffstudio.demo.shapes import (
    COLORS,
    EDGE_MARGIN,
    KINDS,
    SIZE_RADII,
    SIZES,
    Scene,
    ShapeSpec,
    background_phrase,
    render_video,
    sample_background,
)

DIRECTIONS = ("right", "left", "top", "bottom")
START, END = 0.2, 0.8  # the travel along the axis: the side slots' centres (shapes.SLOT_CENTERS)
JITTER = 0.05  # +- on the start, the end and the cross-axis position
SLOW = 3  # a slow clip's crossing lasts this many clips' frames


def motion_clip(rng: np.random.Generator, n_frames: int = 16, size: int = 64, directions=DIRECTIONS,
                slow_prob: float = 0.0):
    """(frames, caption): one shape crossing the picture towards ``direction`` at constant speed, e.g.
    "a red circle moving to the right" or "a small blue star moving to the top, gray background".

    With probability ``slow_prob`` the crossing takes ``SLOW`` times as many frames and the clip is a window of
    ``n_frames`` cut from it at a random frame, captioned "... moving slowly to the ...": a long render made of
    context windows (docs/animatediff.md) then has a motion that a window can continue rather than restart."""
    direction = directions[rng.integers(len(directions))]
    kind, color = KINDS[rng.integers(len(KINDS))], tuple(COLORS)[rng.integers(len(COLORS))]
    size_word = SIZES[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZE_RADII[size_word]))
    lo, hi = EDGE_MARGIN + radius, 1 - EDGE_MARGIN - radius
    start, end, cross = (float(np.clip(c + rng.uniform(-JITTER, JITTER), lo, hi)) for c in (START, END, 0.5))
    if direction in ("left", "top"):
        start, end = 1 - start, 1 - end
    horizontal = direction in ("left", "right")
    slow = slow_prob > 0 and rng.random() < slow_prob  # no draw at 0: the same clips as before
    if slow:  # the window [k, k + n_frames) of a crossing over SLOW * n_frames frames
        span = SLOW * n_frames - 1
        k = int(rng.integers(span - n_frames + 2))
        start, end = start + (end - start) * k / span, start + (end - start) * (k + n_frames - 1) / span
    a = (start, cross) if horizontal else (cross, start)
    b = (end, cross) if horizontal else (cross, end)
    background = sample_background(rng, split_prob=0.0)
    shape = ShapeSpec(kind=kind, color=color, size=size_word, center=a, radius=radius)
    frames, _ = render_video(Scene((shape,), background), None, n_frames, size, motion=[(b[0] - a[0], b[1] - a[1])])
    words = ["a"] + ([size_word] if rng.random() < 0.3 else []) + [color, kind, "moving"]
    words += (["slowly"] if slow else []) + ["to the", direction]
    text = " ".join(words) + (", " + background_phrase(background) if rng.random() < 0.5 else "")
    return frames, text


def write_motion_dataset(folder: str | Path, n: int, n_frames: int = 16, size: int = 64, seed: int = 0,
                         slow_prob: float = 0.0) -> Path:
    """``n`` clips as folders ``00000/0.png ...`` and ``metadata.csv`` (file_name,text); clip i depends on
    (seed, i, slow_prob) only. An existing complete dataset written with the same arguments is kept."""
    import json

    folder = Path(folder)
    meta, recipe = folder / "metadata.csv", folder / "dataset.json"
    wanted = {"clips": n, "frames": n_frames, "size": size, "seed": seed, "slow_prob": slow_prob}
    if meta.exists() and recipe.exists() and json.loads(recipe.read_text()) == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)
    rows = []
    for i in range(n):
        frames, text = motion_clip(np.random.default_rng([seed, i]), n_frames, size, slow_prob=slow_prob)
        clip = folder / f"{i:05d}"
        clip.mkdir(exist_ok=True)
        for k, frame in enumerate(frames):
            frame.save(clip / f"{k}.png")
        rows.append((clip.name, text))
    recipe.write_text(json.dumps(wanted))
    tmp = meta.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:  # written last: its presence marks a whole dataset
        csv.writer(f).writerows([("file_name", "text"), *rows])
    tmp.replace(meta)
    return folder


def build_motion(out: str | Path = "diffstudio/demo/weights/shapes-motion.safetensors",
                 workdir: str | Path = "runs/shapes-motion", *, n_clips: int = 1000, frames: int = 16,
                 steps: int = 3000, batch_size: int = 4, lr: float = 1e-3, lr_end: float | None = 5e-5,
                 warmup: int = 50, schedule: str = "linear", seed: int = 0, slow_prob: float = 0.0,
                 restart: bool = False) -> Path | None:
    """Write the clips into ``workdir/data`` and train the module into ``out`` (see the module docstring)."""
    from diffstudio.train.motion import MotionTrainConfig, train_motion

    workdir = Path(workdir)
    data = write_motion_dataset(workdir / "data", n_clips, frames, seed=seed, slow_prob=slow_prob)
    config = MotionTrainConfig(data=str(data), out=str(out), frames=frames, steps=steps, batch_size=batch_size,
                               lr=lr, lr_end=lr_end, warmup=warmup, schedule=schedule, seed=seed,
                               optimizer="adamw_fused", checkpoint_every=100, workdir=str(workdir / "run"),
                               restart=restart)
    return train_motion(config)


BUILD_DEFAULTS = {name: p.default for name, p in inspect.signature(build_motion).parameters.items()}


def add_motion_parser(sub) -> None:
    """``python -m diffstudio.demo motion``: build (or score) the Shapes motion module."""
    d = BUILD_DEFAULTS
    p = sub.add_parser("motion", help="train the Shapes motion module for the demo model, then score it")
    p.add_argument("--out", default=d["out"])
    p.add_argument("--workdir", default=d["workdir"])
    p.add_argument("--clips", type=int, default=d["n_clips"])
    p.add_argument("--frames", type=int, default=d["frames"])
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--schedule", default=d["schedule"], choices=["linear", "model"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--slow", type=float, default=d["slow_prob"],
                   help="the share of clips cut from crossings 3x slower, captioned 'moving slowly to the ...'")
    p.add_argument("--restart", action="store_true", help="discard the work folder's checkpoint and start over")
    p.add_argument("--score-only", action="store_true", help="only score the file at --out")
    p.add_argument("--seeds", type=int, default=12, help="clips sampled for the score")
    p.add_argument("--long", type=int, metavar="FRAMES",
                   help="score a render of FRAMES frames in context windows instead (motion_eval.evaluate_long_render)")
    p.add_argument("--stride", type=int, default=8, help="--long: the context windows' stride (length 16)")
    p.add_argument("--same-noise", action="store_true", help="--long: one noise draw for every frame")
    p.add_argument("--dilation", type=int, default=1, help="--long: the context windows' dilation (frames apart)")
    p.add_argument("--prompt", default="a red circle moving to the right", help="--long: the prompt")


def run_motion_command(args) -> None:
    import json
    import time

    import diffstudio
    from diffstudio.demo.motion_eval import evaluate_motion
    from diffstudio.motion_loading import add_motion_module
    from diffstudio.train.motion import motion_training_info

    if not args.score_only:
        started = time.time()
        build_motion(args.out, args.workdir, n_clips=args.clips, frames=args.frames, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, seed=args.seed,
                     slow_prob=args.slow, restart=args.restart)
        print(f"wrote {args.out} in {(time.time() - started) / 60:.1f} minutes")
    models = diffstudio.load()
    motion = add_motion_module(models, args.out)
    if args.long:
        from diffstudio.demo.motion_eval import evaluate_long_render

        result = evaluate_long_render(models, args.prompt, seeds=range(args.seeds), frames=args.long,
                                      stride=args.stride, same_noise=args.same_noise, context_dilation=args.dilation)
        for score in result["per_seed"]:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in score.items()
                              if k != "centres"}))
        print(f"keeps moving: {result['keeps_moving']} of {len(result['per_seed'])}")
        return
    result = evaluate_motion(models, motion, seeds=range(args.seeds), frames=args.frames,
                             schedule=motion_training_info(args.out).get("schedule", "linear"))
    print(json.dumps({k: v for k, v in result.items() if k != "per_seed"}, indent=1))
