"""Tiled VAE encode/decode: large images in bounded memory, blended without seams.

The image (or latent) is cut into overlapping tiles laid out evenly along each axis; every tile
goes through the VAE on its own and the results are summed with linear "feather" weights that
rise from ~0 to 1 across each overlap, then divided by the summed weights. Peak activation memory
is that of one tile; the only full-size buffers are the input and the output.

Tiling is not exact: GroupNorm statistics are computed per tile instead of over the whole image,
and convolutions near a tile's border see zero padding instead of neighbours. The overlaps hide
both; a tile that covers the whole input gives exactly the untiled result.

Videos (B, C, T, H, W) tile the same way over H and W, every tile running through all frames (the CogVideoX
VAE chunks time inside its own encode/decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffstudio.errors import InvalidSizeError

DECODE_TILE = 64  # latent pixels (512 image pixels at f = 8)
DECODE_OVERLAP = 16
ENCODE_TILE = 512  # image pixels
ENCODE_OVERLAP = 64
# `decode`/`encode` tile automatically above this many latent pixels (128 x 128 = a 1024 x 1024 image).
AUTO_TILE_LATENT_PIXELS = 128 * 128
PROGRESS_MIN_TILES = 5


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def feather(size: int, overlap_before: int, overlap_after: int) -> torch.Tensor:
    """1-D blend weights of one tile: linear ramps across the overlaps with its neighbours, else 1.

    Where two tiles overlap by L samples their ramps are (p + 0.5) / L and (L - p - 0.5) / L, which
    sum to 1, so overlapping outputs are cross-faded; weights stay > 0 so every sample is covered.
    """
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    w = torch.ones(size)
    if overlap_before > 0:
        w = torch.minimum(w, pos / overlap_before)
    if overlap_after > 0:
        w = torch.minimum(w, (size - pos) / overlap_after)
    return w


def _axis_plan(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Per tile along one axis: (start, end, overlap with the previous tile, overlap with the next)."""
    starts = tile_starts(length, tile, overlap)
    ends = [min(s + tile, length) for s in starts]
    plan = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        before = ends[i - 1] - s if i > 0 else 0
        after = e - starts[i + 1] if i + 1 < len(starts) else 0
        plan.append((s, e, before, after))
    return plan


def _run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: tuple[int, int],
               tile: int, overlap: int, in_scale: int, out_scale: int, progress: bool | None,
               what: str) -> torch.Tensor:
    """Apply `fn` tile by tile. Positions are in grid units (latent pixels); a grid unit is `in_scale`
    samples of `x` and `out_scale` samples of the output."""
    rows, cols = _axis_plan(grid[0], tile, overlap), _axis_plan(grid[1], tile, overlap)
    show = progress if progress is not None else len(rows) * len(cols) >= PROGRESS_MIN_TILES
    out = weight_sum = None
    tiles = [(r, c) for r in rows for c in cols]
    iterator = tiles
    if show:
        from tqdm.auto import tqdm
        iterator = tqdm(tiles, desc=what, unit="tile")
    for (r0, r1, r_before, r_after), (c0, c1, c_before, c_after) in iterator:
        piece = fn(x[..., r0 * in_scale:r1 * in_scale, c0 * in_scale:c1 * in_scale])
        if out is None:  # (B, C_out, [T,] grid_h * out_scale, grid_w * out_scale), accumulated in fp32
            out = torch.zeros(*piece.shape[:-2], grid[0] * out_scale, grid[1] * out_scale,
                              dtype=torch.float32, device=piece.device)
            weight_sum = torch.zeros(grid[0] * out_scale, grid[1] * out_scale, device=piece.device)
            out_dtype = piece.dtype
        wy = feather((r1 - r0) * out_scale, r_before * out_scale, r_after * out_scale)
        wx = feather((c1 - c0) * out_scale, c_before * out_scale, c_after * out_scale)
        w = (wy[:, None] * wx[None, :]).to(piece.device)
        region = (slice(r0 * out_scale, r1 * out_scale), slice(c0 * out_scale, c1 * out_scale))
        out[(..., *region)] += piece.float() * w
        weight_sum[region] += w
    return (out / weight_sum).to(out_dtype)


def _check_tiling(tile: int, overlap: int, unit: str) -> None:
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise InvalidSizeError(f"tile {tile} and overlap {overlap} {unit}: need 0 <= overlap < tile; "
                               f"try overlap = tile // 4.")


def decode_tiled(vae, latents: torch.Tensor, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP,
                 progress: bool | None = None) -> torch.Tensor:
    """Decode (B, z, h, w) latents in `tile` x `tile` latent-pixel tiles overlapping by `overlap`."""
    _check_tiling(tile, overlap, "latent pixels")
    h, w = latents.shape[-2:]
    if h <= tile and w <= tile:
        return vae.decode(latents)
    return _run_tiled(vae.decode, latents, (h, w), tile, overlap, in_scale=1,
                      out_scale=vae.downscale_factor, progress=progress, what="VAE decode")


def encode_tiled(vae, images: torch.Tensor, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP,
                 progress: bool | None = None) -> torch.Tensor:
    """Encode (B, 3, H, W) images in `tile`-pixel tiles overlapping by `overlap` pixels -> latent mean."""
    f = vae.downscale_factor
    _check_tiling(tile, overlap, "pixels")
    height, width = images.shape[-2:]
    if tile % f or overlap % f or height % f or width % f:
        raise InvalidSizeError(f"tiled encoding needs the image size {height}x{width}, the tile {tile} and "
                               f"the overlap {overlap} to be multiples of {f} pixels.")
    if height <= tile and width <= tile:
        return vae.encode(images)
    return _run_tiled(vae.encode, images, (height // f, width // f), tile // f, overlap // f,
                      in_scale=f, out_scale=1, progress=progress, what="VAE encode")


def decode(vae, latents: torch.Tensor, tiled: bool | None = None, **tiling) -> torch.Tensor:
    """Decode, tiling when asked, or (tiled=None) when the latent exceeds AUTO_TILE_LATENT_PIXELS."""
    if tiled is None:
        tiled = latents.shape[-2] * latents.shape[-1] > AUTO_TILE_LATENT_PIXELS
    return decode_tiled(vae, latents, **tiling) if tiled else vae.decode(latents)


def encode(vae, images: torch.Tensor, tiled: bool | None = None, **tiling) -> torch.Tensor:
    """Encode to the latent mean, tiling when asked or when the image is above the auto threshold."""
    if tiled is None:
        f = vae.downscale_factor
        tiled = (images.shape[-2] // f) * (images.shape[-1] // f) > AUTO_TILE_LATENT_PIXELS
    return encode_tiled(vae, images, **tiling) if tiled else vae.encode(images)
