"""Tiled diffusion (Bar-Tal et al. 2023, "MultiDiffusion"): images larger than the model was trained for.

Each step, the guided denoiser runs on overlapping tiles of the latent, and every latent pixel's x0 is the
weighted mean of the predictions of the tiles that hold it (MultiDiffusion's closed-form step, eq. 5, in x0
space). A tile's weight is highest at its centre and falls towards its borders (a separable tent, never
zero inside the tile), so the seams where tiles meet blend smoothly; with one tile covering the latent the
result is the plain run, bit for bit.

It is a LATENT-stage module (modules.py): it sees ``D(x, sigma)`` after guidance and passes the tile's
position down as the keyword ``tile=(top, left, height, width)`` (latent pixels), so network-stage modules
that hold image-sized inputs (ControlNet hints) can crop them to the tile.
"""

from __future__ import annotations

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import LATENT, Generation, Wrapper
from diffstudio.pipeline.tiled_vae import tile_starts  # tiles laid evenly, at least `overlap` shared


def tile_weight(height: int, width: int) -> torch.Tensor:
    """(height, width) tent: 1 at the centre, falling linearly to 1/(n+1) at the border rows/columns."""

    def tent(n: int) -> torch.Tensor:
        centre = (n - 1) / 2
        return 1 - (torch.arange(n, dtype=torch.float32) - centre).abs() / (centre + 1)

    return tent(height)[:, None] * tent(width)[None, :]


class TiledDiffusion:
    """``TiledDiffusion(tile=64, overlap=32)`` in image pixels (rounded to the latent grid)."""

    order = LATENT

    def __init__(self, tile: int | tuple[int, int] = 512, overlap: int = 64, max_batch: int = 1):
        self.tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        self.overlap, self.max_batch = int(overlap), int(max_batch)
        if min(self.tile) <= 0 or self.overlap < 0 or self.overlap >= min(self.tile):
            raise InvalidInputError(f"tiled diffusion needs tiles > 0 and 0 <= overlap < tile, got tile {self.tile} "
                                    f"and overlap {self.overlap}")

    def recipe(self) -> dict:
        return {"tiled_diffusion": {"tile": list(self.tile), "overlap": self.overlap}}

    def wrap(self, denoiser, gen: Generation):
        if gen.request.regions and gen.request.region_mode == "attention":
            raise InvalidInputError("tiled diffusion works with latent-mode regions only: attention-mode regions "
                                    "build their masks for the whole image")
        down = gen.family.latent.downscale
        _, h, w = gen.latent_shape
        th, tw = min(h, max(1, self.tile[0] // down)), min(w, max(1, self.tile[1] // down))
        ov = self.overlap // down
        tiles = [(top, left, th, tw) for top in tile_starts(h, th, min(ov, th - 1))
                 for left in tile_starts(w, tw, min(ov, tw - 1))]
        return TiledDenoiser(denoiser, tiles, tile_weight(th, tw))


class TiledDenoiser(Wrapper):
    def __init__(self, inner, tiles: list[tuple[int, int, int, int]], weight: torch.Tensor):
        super().__init__(inner)
        self.tiles, self.weight = tiles, weight
        self.network_calls = 0

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        if len(self.tiles) == 1 and self.tiles[0][2:] == tuple(x.shape[-2:]):
            return self.inner(x, sigma, **extra)  # one tile over the whole latent: the plain run
        total = torch.zeros_like(x)
        weights = torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
        w = self.weight.to(x)
        for top, left, th, tw in self.tiles:
            window = (..., slice(top, top + th), slice(left, left + tw))
            x0 = self.inner(x[window], sigma, tile=(top, left, th, tw), **extra)
            self.network_calls += 1
            total[window] += x0 * w
            weights[top:top + th, left:left + tw] += w
        return total / weights
