"""The Shapes ControlNet: outlines steer the demo model's kind and position, the prompt keeps the colour.

    OMP_NUM_THREADS=1 python -m diffstudio.demo.controlnet_build \
        --workdir runs/shapes-controlnet --out diffstudio/demo/weights/shapes-controlnet.safetensors

The control image is the outline of the shapes: the canny annotator (``diffstudio.control.canny``, the one a
user runs on a photo) on the clean render of the scene. The captions name each shape's colour but never its
kind or position ("a red shape, white background"), so the only way the trained ControlNet can lower the loss
is to read kind and position from the outline. It is trained by the public trainer
(``diffstudio.train.controlnet.train_controlnet``) on the packaged demo model, like any user's ControlNet;
the dataset is an ordinary folder in the trainer's layout (``write_control_dataset``). Every step checkpoints
into the work folder, so a killed build resumes. docs/controlnet.md gives the time and the measured scores.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from diffstudio.demo.shapes import Scene, ShapeSpec, background_phrase, render, sample_scene

WEIGHTS = Path(__file__).parent / "weights" / "shapes-controlnet.safetensors"
BACKGROUND_SHARE = 0.7  # captions that name the background, as in the Shapes dataset


def outline(scene: Scene, size: int = 64):
    """The control image of ``scene``: canny edges (white on black, RGB) of its clean render."""
    from diffstudio.control import canny

    return canny(render(scene, size))


def shape_caption(scene: Scene, name_background: bool) -> str:
    """The caption of ``scene`` that names each shape's colour only: "a red shape, white background"."""
    text = " and ".join(f"a {shape.color} shape" for shape in scene.shapes)
    return text + (", " + background_phrase(scene.background) if name_background else "")


def write_control_dataset(folder, n: int, size: int = 64, seed: int = 0, max_shapes: int = 1,
                          progress: bool = True) -> Path:
    """``n`` single-shape scenes (item i from (seed, i)): ``images/i.png``, ``outlines/i.png`` and
    ``metadata.csv`` (file_name, conditioning_image, text) in ``folder``; the CSV is written last, so a folder
    that has it is complete."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "outlines").mkdir(exist_ok=True)
    rows = []
    for i in tqdm(range(n), desc="shapes + outlines", unit="image", disable=not progress):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, max_shapes=max_shapes)
        name = f"{i:05d}.png"
        render(scene, size).save(folder / "images" / name)
        outline(scene, size).save(folder / "outlines" / name)
        rows.append((f"images/{name}", f"outlines/{name}", shape_caption(scene, rng.random() < BACKGROUND_SHARE)))
    tmp = folder / "metadata.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "conditioning_image", "text"])
        writer.writerows(rows)
    tmp.replace(folder / "metadata.csv")
    return folder


def build(out: str | Path = WEIGHTS, workdir: str | Path = "runs/shapes-controlnet", *, n_images: int = 4000,
          steps: int = 1000, batch_size: int = 32, lr: float = 1e-3, lr_end: float | None = 5e-5, warmup: int = 50,
          caption_dropout: float = 0.1, seed: int = 0, stop_after: int | None = None) -> Path | None:
    """Write the dataset into ``workdir/data`` (once) and train the ControlNet on the packaged demo model."""
    from diffstudio.train.controlnet import ControlNetTrainConfig, train_controlnet

    workdir = Path(workdir)
    data = workdir / f"data-{n_images}-{seed}"
    if not (data / "metadata.csv").exists():
        write_control_dataset(data, n_images, seed=seed)
    config = ControlNetTrainConfig(data=str(data), out=str(out), steps=steps, batch_size=batch_size, lr=lr,
                                   lr_end=lr_end, warmup=warmup, resolution=64, buckets=False,
                                   caption_dropout=caption_dropout, optimizer="adamw_fused", seed=seed,
                                   checkpoint_every=100, workdir=str(workdir / "run"), save_dtype="fp16")
    return train_controlnet(config, stop_after=stop_after)


# --- measuring it ----------------------------------------------------------------------------------------------

# The two checks of tests/test_controlnet_shapes.py: (the outline's scene, the prompt).
CHECKS = {
    "star on the left": (Scene((ShapeSpec("star", "blue", "left", "large"),)), "a red shape"),
    "square at the top": (Scene((ShapeSpec("square", "blue", "top", "large"),)), "a red shape"),
    "triangle at the bottom": (Scene((ShapeSpec("triangle", "blue", "bottom", "large"),)), "a green shape"),
}


def score_outline(models, controlnet, scene: Scene, prompt: str, seeds=range(12), scale: float = 1.0) -> dict:
    """Generate ``prompt`` under the outline of ``scene`` for each seed; the share of images whose largest shape
    the scorer reads as the scene's kind, position, and the prompt's colour."""
    import diffstudio
    from diffstudio.demo.score import read_image
    from diffstudio.pipeline.control import ControlNetUnit

    want = scene.shapes[0]
    color = next(w for w in prompt.split() if w in ("red", "yellow", "green", "cyan", "blue", "purple"))
    pipe = diffstudio.Pipeline(models)
    units = [ControlNetUnit(controlnet, outline(scene), scale=scale)] if controlnet is not None and scale else []
    hits = {"kind": 0, "position": 0, "color": 0, "all": 0}
    for seed in seeds:
        shapes = read_image(pipe(prompt, seed=seed, controlnets=units, progress=False)[0])
        got = shapes[0] if shapes else None
        ok = {"kind": got is not None and got.kind == want.kind,
              "position": got is not None and got.position == want.position,
              "color": got is not None and got.color == color}
        ok["all"] = all(ok.values())
        for key, value in ok.items():
            hits[key] += value
    return {key: value / len(seeds) for key, value in hits.items()}


def main(argv: list[str] | None = None) -> None:
    import inspect
    import json
    import time

    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()}
    parser = argparse.ArgumentParser(prog="python -m diffstudio.demo.controlnet_build",
                                     description="train the Shapes ControlNet (outlines) on the packaged demo model")
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--workdir", default=defaults["workdir"])
    for name in ("n_images", "steps", "batch_size", "lr", "warmup", "caption_dropout", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=defaults[name])
    parser.add_argument("--lr-end", type=lambda s: None if s == "none" else float(s), default=defaults["lr_end"])
    parser.add_argument("--evaluate", action="store_true", help="only score the --out file (12 seeds per check)")
    args = parser.parse_args(argv)
    if not args.evaluate:
        started = time.time()
        build(args.out, args.workdir, n_images=args.n_images, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, lr_end=args.lr_end, warmup=args.warmup, caption_dropout=args.caption_dropout,
              seed=args.seed)
        print(f"wrote {args.out} in {(time.time() - started) / 60:.1f} minutes")
    import diffstudio

    models = diffstudio.load()
    controlnet = models.add_controlnet(args.out)
    scores = {name: {"with": score_outline(models, controlnet, scene, prompt),
                     "without": score_outline(models, None, scene, prompt)} for name, (scene, prompt) in CHECKS.items()}
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
