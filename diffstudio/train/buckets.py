"""Aspect-ratio buckets (NovelAI 2022, "Improvements to Stable Diffusion", sec. "aspect ratio bucketing").

Images of every shape train at about the same pixel count: each image goes to the bucket
(w, h) nearest its aspect ratio, with w and h multiples of ``multiple`` and w * h close to
``resolution ** 2``. A batch only ever holds images of one bucket, and which images form
step N's batch is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math

import torch


def bucket_sizes(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution**2`` pixels, from 1:max_ratio to max_ratio:1."""
    area = resolution * resolution
    sizes = set()
    w = multiple
    while w <= resolution * max_ratio:
        h = max(multiple, int(area / w) // multiple * multiple)
        if 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((w, h))
            sizes.add((h, w))
        w += multiple
    sizes.add((resolution // multiple * multiple,) * 2)
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 1:2 and 2:1 are symmetric)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def bucket_batches(buckets: list[int], batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the images in step ``step``'s batch.

    Each epoch: shuffle the images of every bucket, cut them into batches of ``batch_size``
    (a bucket's last, smaller batch is kept), then shuffle the order of all batches. Everything
    is drawn from a generator seeded by (seed, epoch).
    """
    groups: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    per_epoch = sum(math.ceil(len(g) / batch_size) for g in groups.values())
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        order = torch.randperm(len(members), generator=gen).tolist()
        shuffled = [members[i] for i in order]
        batches += [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
    return batches[torch.randperm(len(batches), generator=gen)[offset].item()]
