"""Region masks -> blending weights, at latent resolution and on a model's token grids.

A region's mask is built at the latent resolution (h, w): a box exactly (each latent pixel
holds the fraction of its area the box covers), an image mask by area-averaging it from
pixel resolution. Feathering blurs the mask with a Gaussian (replicate padding, so a region
that touches the image border stays whole there).

Blending weights (docs/regions.md). With region masks m_r in [0, 1] and weights w_r:

    A   = sum_r w_r m_r                   how much the regions claim a pixel
    g   = global_weight + max(0, 1 - A)   the global prompt: a base share, plus what is not covered
    S   = g + A                           (>= 1, so never a division by zero)
    w_global = g / S,   w_region_r = w_r m_r / S

The weights are >= 0 and sum to 1 at every pixel. Latent mode blends the x0 predictions with
them; attention mode adds their logarithm to the attention logits of each prompt's text tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffstudio.errors import RegionError


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """(height, width) mask of a box (x0, y0, x1, y1) in fractions of the image: each pixel holds
    the share of its area inside the box (1 inside, fractions along edges that cut a pixel)."""
    x0, y0, x1, y1 = box

    def coverage(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n  # pixel i spans [edges[i], edges[i+1]]
        overlap = (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
        return (overlap.clamp(min=0) * n).float()

    return coverage(y0, y1, height)[:, None] * coverage(x0, x1, width)[None, :]


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a (h, w) mask by a Gaussian of std ``sigma`` pixels; the border is extended (replicate)."""
    if sigma <= 0:
        return mask
    radius = max(1, math.ceil(3 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = kernel / kernel.sum()
    m = mask[None, None].float()
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m[0, 0]


def region_mask(region, image_size: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """One region's (h, w) mask in [0, 1] at latent resolution. ``image_size`` is (width, height)."""
    from diffstudio.io.images import load_mask

    h, w = latent_hw
    if region.box is not None:
        mask = box_mask(region.box, h, w)
    elif region.mask is not None:
        pixels = load_mask(region.mask, image_size)                        # (1, 1, H, W)
        mask = F.interpolate(pixels, size=(h, w), mode="area")[0, 0]
    else:
        mask = torch.ones(h, w)
    mask = gaussian_blur(mask, region.feather * min(h, w)).clamp(0, 1)
    if not mask.max() > 0:
        raise RegionError(f"the region {region.prompt!r} covers nothing: its mask is all black at "
                          f"{image_size[0]}x{image_size[1]}; paint the region white (or pass a box)")
    return mask


def blend_weights(masks: torch.Tensor, weights: torch.Tensor, global_weight: float) -> torch.Tensor:
    """(R, h, w) masks and (R,) weights -> (1 + R, h, w) weights summing to 1 per pixel; entry 0 is
    the global prompt's (formula in the module docstring)."""
    claimed = masks * weights.view(-1, 1, 1).to(masks)                     # (R, h, w)
    total = claimed.sum(0)
    g = global_weight + (1 - total).clamp(min=0)
    return torch.cat([g[None], claimed]) / (g + total)[None]


def token_grid_weights(weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(G, h, w) blending weights -> (G, gh * gw) on a token grid (row-major, as the models flatten
    their feature maps), by area averaging, which keeps the per-token sum at 1."""
    if tuple(weights.shape[-2:]) != tuple(grid):
        weights = F.interpolate(weights[None].float(), size=tuple(grid), mode="area")[0]
    return weights.flatten(1)
