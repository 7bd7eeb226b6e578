"""What the trainers cache, and how a training step draws its batch from the cache.

Trainers that leave the VAE and the text encoders frozen (LoRA, ControlNet) run them once per image and
caption: each image is put in its aspect-ratio bucket (``train.buckets``), encoded to a latent, and its
caption to the family's conditioning. A ControlNet's control image (the *hint*) is fitted to the same bucket
size as its image and kept as uint8. The cache lives in ``<workdir>/cache.pt`` and is reused while its key
(a hash of what the frozen models see: ``cache_key``) is unchanged.

A step's batch is a pure function of (seed, step): ``draw_batch`` picks the images of step N by
``bucket_batches`` and decides each one's caption dropout from the step's generator, so a resumed run sees
exactly the batches (and the same later noise draws) as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

# The recipe fields that decide what the frozen VAE and text encoders make of the data.
CACHED_FROM = ("data", "model", "resolution", "buckets", "caption_dropout", "precision")


def cache_key(recipe: dict, fields: tuple[str, ...] = CACHED_FROM) -> str:
    """The cache holds what the frozen VAE and text encoders make of the data: it is reused while the recipe's
    ``fields`` that decide it agree."""
    used = {key: recipe[key] for key in fields}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


def _hint_tensor(picture) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W)."""
    size = picture.size
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3).permute(2, 0, 1)


def prepare_items(models, rows, *, resolution: int, buckets: bool, caption_dropout: float,
                  hints: list | None = None) -> dict:
    """Each row (image path, caption) -> its bucket id and an item {latent (C, h, w), cond (batch dim 1),
    size [w, h]} (+ ``hint``: uint8 (3, H, W), the control image ``hints[i]`` fitted like the image).

    ``empty`` holds the empty prompt's conditioning per bucket size when captions are dropped."""
    from PIL import Image, ImageOps
    from tqdm.auto import tqdm

    from diffstudio.io.images import images_to_tensor
    from diffstudio.pipeline.generate import Pipeline
    from diffstudio.train.buckets import bucket_sizes, nearest_bucket
    from diffstudio.train.conditioning import caption_encoder

    family = models.family
    multiple = family.latent.downscale * 8
    sizes = bucket_sizes(resolution, multiple) if buckets else [(resolution, resolution)]
    pipe = Pipeline(models)
    encode = caption_encoder(models)
    items, bucket_ids, empty = [], [], {}
    encoded: dict[tuple[str, tuple[int, int]], dict] = {}  # a caption repeated at a size is encoded once
    for i, (path, caption) in enumerate(tqdm(rows, desc="caching latents and captions")):
        image = Image.open(path).convert("RGB")
        size = nearest_bucket(*image.size, sizes)
        image = ImageOps.fit(image, size, Image.LANCZOS)  # resize to cover, centre crop
        with torch.no_grad():
            latent = pipe.encode_images(images_to_tensor([image]), tiled=False)[0]
            if (caption, size) not in encoded:
                encoded[caption, size] = encode(caption, size)
            cond = encoded[caption, size]
            if size not in empty and caption_dropout > 0:
                empty[size] = encode("", size)
        bucket_ids.append(sizes.index(size))
        item = {"latent": latent, "cond": cond, "size": list(size)}
        if hints is not None:  # the same cover-and-centre-crop, so the control image stays on its image
            item["hint"] = _hint_tensor(ImageOps.fit(Image.open(hints[i]).convert("RGB"), size, Image.LANCZOS))
        items.append(item)
    return {"items": items, "buckets": bucket_ids,
            "empty": {f"{w}x{h}": c for (w, h), c in empty.items()}}


def load_or_build_cache(path: Path, key: str, build) -> dict:
    """The cache at ``path`` if its key is ``key``, else ``build()`` written there (atomically) and returned."""
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached
    data = build()
    data["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # then renamed: a failed write leaves the old cache whole
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def draw_batch(data: dict, step: int, seed: int, batch_size: int, caption_dropout: float):
    """Step ``step``'s batch: (image indices, the step's generator, latents x0 (B, C, h, w) float32, the batch's
    conditioning). Each item's caption is replaced by the empty prompt with probability ``caption_dropout``,
    drawn from the generator, which the caller goes on using for the noise."""
    from diffstudio.train.buckets import bucket_batches
    from diffstudio.train.conditioning import collate
    from diffstudio.train.loop import step_generator

    items = data["items"]
    gen = step_generator(seed, step)
    idx = bucket_batches(data["buckets"], batch_size, step, seed)
    x0 = torch.stack([items[i]["latent"] for i in idx]).float()
    conds = []
    for i in idx:
        dropped = caption_dropout and torch.rand((), generator=gen).item() < caption_dropout
        size = items[i]["size"]
        conds.append(data["empty"][f"{size[0]}x{size[1]}"] if dropped else items[i]["cond"])
    return idx, gen, x0, collate(conds)
