"""Seams of tiled diffusion on the demo model: 128x64 images in 64x64 tiles (overlap 32), 12 seeds.

A seam shows as a jump between neighbouring pixel columns where tiles meet. The figure is the mean absolute
difference between neighbouring columns at the tiles' borders, divided by the same mean over all columns
(1.0 = a border column looks like any other column; a visible seam is several times larger).

    python tools/shapes/seams.py
"""

from __future__ import annotations

import numpy as np
import torch

import diffstudio
from diffstudio.pipeline.tiled_diffusion import TiledDiffusion
from diffstudio.pipeline.tiled_vae import tile_starts


def column_jumps(image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64)
    return np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2))  # (width - 1,): column i vs i + 1


def main(seeds: int = 12) -> None:
    torch.set_num_threads(1)
    pipe = diffstudio.Pipeline(diffstudio.load())
    module = TiledDiffusion(tile=64, overlap=32)
    # tile borders in pixels: where a tile starts or ends inside the image
    starts = [s * 8 for s in tile_starts(16, 8, 4)]
    borders = sorted({s for s in starts if s > 0} | {s + 64 for s in starts if s + 64 < 128})
    ratios = []
    for seed in range(seeds):
        image = pipe("a red circle on the left, white background", width=128, height=64, seed=seed,
                     modules=[module], progress=False)[0]
        jumps = column_jumps(image)
        ratios.append(np.mean([jumps[b - 1] for b in borders]) / max(jumps.mean(), 1e-9))
    print(f"tile borders at x = {borders}; border jump / mean jump over {seeds} seeds: "
          f"mean {np.mean(ratios):.2f}, max {np.max(ratios):.2f}")


if __name__ == "__main__":
    main()
