"""Training data: a folder of images with captions.

Captions come from ``metadata.csv`` (columns ``file_name,text``, the Hugging Face
image-folder convention) or from a ``.txt`` file beside each image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from diffstudio.errors import ModelNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captioned(folder: str | Path, is_item, what: str, looked_for: str,
                   caption_file=lambda item: item.with_suffix(".txt")) -> list[tuple[Path, str]]:
    """[(item path, caption)] of a training data folder: the rows of its metadata.csv (file_name, text), else every
    item (``is_item``) in name order with the caption in its ``caption_file`` (empty when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"training data folder {folder} does not exist")
    meta = folder / "metadata.csv"
    if meta.exists():
        with meta.open(newline="", encoding="utf-8") as f:
            rows = [(folder / r["file_name"], r["text"]) for r in csv.DictReader(f)]
        missing = [str(p) for p, _ in rows if not p.exists()]
        if missing:
            raise ModelNotFoundError(f"{len(missing)} {what}s listed in {meta} are missing, e.g. {missing[0]}")
    else:
        rows = []
        for item in sorted(p for p in folder.iterdir() if is_item(p)):
            txt = caption_file(item)
            rows.append((item, txt.read_text(encoding="utf-8").strip() if txt.exists() else ""))
    if not rows:
        raise ModelNotFoundError(f"{folder} has no {what}s (looked for metadata.csv or {looked_for})")
    return rows


def read_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """[(image path, caption)] of an image training folder (``read_captioned``)."""
    return read_captioned(folder, lambda p: p.suffix.lower() in IMAGE_SUFFIXES, "image", ", ".join(IMAGE_SUFFIXES))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sample indices of training step `step`: a pure function of (seed, step), so a resumed
    run sees exactly the batches an uninterrupted one would (epoch-wise permutations)."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[offset * batch_size:(offset + 1) * batch_size]
