"""Nearest-neighbour fields (NNFs) and the box filter that turns pixel errors into patch errors.

FastBlend (arXiv 2311.09265, Sec. 3.1) matches every patch of a target frame to a patch of a source
frame. During the search we store the match as absolute source coordinates ``coords`` of shape
(B, 2, H, W), int32, channel 0 = row and channel 1 = column, always inside the source image: target
pixel q is matched to source pixel coords[:, :, q]. The *displacement* field v(q) = coords(q) - q is
what the public API returns.

Patch distances are computed without unfolding patches: a candidate field gives every pixel its own
squared difference (one gather per pixel), and a box filter sums those over each patch window
(``box_sum``). Where the candidate is locally a translation, which is what propagation and the
tile-coherent random search produce, this equals the patch distance of PatchMatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """Every pixel's own (row, column), shape (1, 2, H, W), int32: the identity field."""
    rows = torch.arange(height, dtype=torch.int32, device=device).view(height, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.int32, device=device).view(1, width).expand(height, width)
    return torch.stack((rows, cols)).unsqueeze(0)


def clamp_coords(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip source coordinates (B, 2, H', W') into an (height, width) image, in place."""
    coords.clamp_(min=0)
    limit = torch.tensor([height - 1, width - 1], dtype=coords.dtype, device=coords.device).view(1, 2, 1, 1)
    return torch.minimum(coords, limit, out=coords)


def upsample_coords(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Coarse-to-fine step of the pyramid: a coarse match covers 2x2 fine pixels.

    The displacement doubles: fine pixel q = 2p + o (o in {0, 1}^2) is matched to 2*coords(p) + o.
    (B, 2, h, w) -> (B, 2, height, width) with height <= 2h, width <= 2w.
    """
    fine = (coords * 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :height, :width]
    parity = pixel_grid(height, width, coords.device) % 2
    return clamp_coords(fine + parity, height, width)


def displacement(coords: torch.Tensor) -> torch.Tensor:
    """Displacement field v = coords - q, (B, 2, H, W) int32."""
    return coords - pixel_grid(coords.shape[2], coords.shape[3], coords.device)


def replicate_pad(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Pad (B, C, H, W) by ``radius`` on every side, repeating the border; any dtype, any device.

    (``F.pad(mode="replicate")`` has no integer kernels on some devices.)
    """
    if radius == 0:
        return images
    height, width = images.shape[2], images.shape[3]
    rows = torch.arange(-radius, height + radius, device=images.device).clamp_(0, height - 1)
    cols = torch.arange(-radius, width + radius, device=images.device).clamp_(0, width - 1)
    return images.index_select(2, rows).index_select(3, cols)


def box_sum(error: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum of ``error`` (B, H, W) over the patch_size x patch_size window centred on each pixel.

    Zero padding outside the image: a border patch only counts its pixels inside the image. Done by
    separable shift-and-add, which on CPU is several times faster than avg_pool2d or cumsum
    differences for the small odd windows used here, and is deterministic on every device.
    """
    radius = patch_size // 2
    if radius == 0:
        return error
    _, height, width = error.shape
    padded = F.pad(error, (radius, radius, radius, radius))
    rows = padded[:, 0:height].clone()
    for i in range(1, patch_size):
        rows += padded[:, i:i + height]
    out = rows[:, :, 0:width].clone()
    for i in range(1, patch_size):
        out += rows[:, :, i:i + width]
    return out


def tile_offsets(generator: torch.Generator, height: int, width: int, tile: int, radius: int) -> torch.Tensor:
    """A random displacement per square tile, (2, H, W) int32 on the CPU.

    Random search (PatchMatch's second step) tries ``coords + offset``. Drawing one offset per tile,
    not per pixel, keeps the candidate a translation over most patches, so that the box-filtered
    pixel errors measure it correctly. The tile grid is shifted at random on every call so that
    tile borders fall in different places.
    """
    shift_y, shift_x = torch.randint(0, tile, (2,), generator=generator).tolist()
    tiles_y = (height + shift_y) // tile + 1
    tiles_x = (width + shift_x) // tile + 1
    offsets = torch.randint(-radius, radius + 1, (2, tiles_y, tiles_x), generator=generator,
                            dtype=torch.int32)
    full = offsets.repeat_interleave(tile, dim=1).repeat_interleave(tile, dim=2)
    return full[:, shift_y:shift_y + height, shift_x:shift_x + width]
