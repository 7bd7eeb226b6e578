"""The Shapes IP-Adapter: a reference picture gives the demo model's shape its colour, the prompt keeps the kind.

    python -m diffstudio.demo ip-adapter --workdir runs/shapes-ip-adapter \
        --out diffstudio/demo/weights/shapes-ip-adapter.safetensors

(the defaults are the shipped file's recipe: 1,000 pictures, 300 steps of batch 16 at lr 2e-3.)

It is trained by the public trainer (``diffstudio.train.ip_adapter.train_ip_adapter``, what
``diffstudio train ip-adapter`` runs) on the packaged demo model, with a new Shapes image encoder
(models/shapes_image_encoder.py) trained with it and bundled in the same file. The data are single-shape Shapes
pictures, each its own reference (the paper's recipe); half of the captions leave the colour out
("a circle on the left, white background"), so the colour must come through the image tokens for those. Every
checkpoint goes into the work folder, so a killed build resumes. docs/shapes.md gives the time and the scores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from diffstudio.demo.shapes import ShapesDataset

WEIGHTS = Path(__file__).parent / "weights" / "shapes-ip-adapter.safetensors"


def drop_color(text: str, color: str) -> str:
    """The caption without its shape's colour word: "a large red circle ..." -> "a large circle ..."."""
    return text.replace(f" {color} ", " ", 1)


def write_reference_dataset(folder, n: int, size: int = 64, seed: int = 0, color_drop: float = 0.5,
                            progress: bool = True) -> Path:
    """``n`` single-shape Shapes pictures (item i from (seed, i)) and ``metadata.csv`` (file_name, text) in
    ``folder``; a share ``color_drop`` of the captions leave the colour out (drawn per item). The CSV is written
    last, so a folder that has it is complete."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(n, size=size, seed=seed, max_shapes=1)
    rows = []
    for i in tqdm(range(n), desc="shapes references", unit="image", disable=not progress):
        sample = data.sample(i)
        name = f"{i:05d}.png"
        sample.image.save(folder / name)
        drop = np.random.default_rng([seed, i, 1]).random() < color_drop
        rows.append((name, drop_color(sample.text, sample.scene.shapes[0].color) if drop else sample.text))
    tmp = folder / "metadata.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    tmp.replace(folder / "metadata.csv")
    return folder


def build(out: str | Path = WEIGHTS, workdir: str | Path = "runs/shapes-ip-adapter", *, n_images: int = 1000,
          steps: int = 300, batch_size: int = 16, lr: float = 2e-3, lr_end: float | None = 5e-5, warmup: int = 20,
          caption_dropout: float = 0.1, image_dropout: float = 0.1, color_drop: float = 0.5, seed: int = 0,
          stop_after: int | None = None) -> Path | None:
    """Write the dataset into ``workdir/data-N-SEED`` (once) and train the adapter on the packaged demo model."""
    from diffstudio.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter

    workdir = Path(workdir)
    data = workdir / f"data-{n_images}-{seed}-{color_drop}"
    if not (data / "metadata.csv").exists():
        write_reference_dataset(data, n_images, seed=seed, color_drop=color_drop)
    config = IPAdapterTrainConfig(data=str(data), out=str(out), steps=steps, batch_size=batch_size, lr=lr,
                                  lr_end=lr_end, warmup=warmup, resolution=64, buckets=False,
                                  caption_dropout=caption_dropout, image_dropout=image_dropout,
                                  optimizer="adamw_fused", seed=seed, checkpoint_every=100,
                                  workdir=str(workdir / "run"), save_dtype="fp16")
    return train_ip_adapter(config, stop_after=stop_after)


# --- measuring it ----------------------------------------------------------------------------------------------


def reference(color: str = "blue", kind: str = "square", size: int = 64):
    """A reference picture: one large shape of ``color`` in the centre of a white background."""
    from diffstudio.demo.shapes import Scene, ShapeSpec, render

    return render(Scene((ShapeSpec(kind, color, "center", "large"),)), size)


def color_rate(models, prompt: str, color: str, adapter=None, seeds=range(12), scale: float = 1.0) -> dict:
    """Generate ``prompt`` (with the image prompt of a ``color`` square when ``adapter`` is given) for each seed;
    the share of images whose largest shape the scorer reads as ``color``, and as the prompt's kind."""
    import diffstudio
    from diffstudio.demo.score import read_image
    from diffstudio.demo.shapes import ALL_KINDS
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    kind = next((w for w in prompt.replace(",", " ").split() if w in ALL_KINDS), None)
    pipe = diffstudio.Pipeline(models)
    prompts = [ImagePrompt(reference(color), scale=scale, model=adapter)] if adapter is not None else None
    hits = {"color": 0, "kind": 0}
    for seed in seeds:
        shapes = read_image(pipe(prompt, seed=seed, ip_adapter=prompts, progress=False)[0])
        got = max(shapes, key=lambda s: s.area) if shapes else None
        hits["color"] += got is not None and got.color == color
        hits["kind"] += got is not None and got.kind == kind
    return {key: value / len(seeds) for key, value in hits.items()}


CHECKS = [("a circle in the center, white background", "blue"), ("a circle", "blue"),
          ("a triangle on the left, white background", "green"), ("a star at the top, black background", "red")]


def add_parser(sub) -> None:
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()}
    p = sub.add_parser("ip-adapter", help="train the Shapes IP-Adapter (and its image encoder) on the demo model")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--workdir", default=defaults["workdir"])
    for name in ("n_images", "steps", "batch_size", "lr", "warmup", "caption_dropout", "image_dropout",
                 "color_drop", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=defaults[name])
    p.add_argument("--lr-end", type=lambda s: None if s == "none" else float(s), default=defaults["lr_end"])
    p.add_argument("--evaluate", action="store_true", help="only score the --out file (12 seeds per check)")


def run_command(args) -> None:
    import json
    import time

    if not args.evaluate:
        started = time.time()
        build(args.out, args.workdir, n_images=args.n_images, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, lr_end=args.lr_end, warmup=args.warmup, caption_dropout=args.caption_dropout,
              image_dropout=args.image_dropout, color_drop=args.color_drop, seed=args.seed)
        print(f"wrote {args.out} in {(time.time() - started) / 60:.1f} minutes")
    import diffstudio

    models = diffstudio.load()
    adapter = models.add_ip_adapter(args.out)
    scores = {f"{prompt} + {color} reference": {"with": color_rate(models, prompt, color, adapter),
                                                "without": color_rate(models, prompt, color)}
              for prompt, color in CHECKS}
    print(json.dumps(scores, indent=1))
