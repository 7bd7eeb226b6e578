"""Denoiser wrappers that combine model calls: classifier-free guidance and inpainting blends.

Each wrapper is itself a denoiser ``D(x, sigma, **cond) -> x0`` with the wrapped one's
``kind``, so samplers see no difference and wrappers compose.
"""

from __future__ import annotations

import torch


def _batched(cond: dict, uncond: dict) -> dict:
    """Stack conditional and unconditional kwargs along the batch axis (one model call)."""
    out = {}
    for key in cond:
        a, b = cond[key], uncond[key]
        out[key] = torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
    return out


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): x0 = u + w (c - u), in x0 space.

    With w == 1 the unconditional branch is skipped (one call instead of two).
    """

    def __init__(self, inner, cond: dict, uncond: dict, scale: float):
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, float(scale)
        self.kind = inner.kind

    def __getattr__(self, name):  # sigma_min, sigma_max, noise_scaling, ... of the wrapped denoiser
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, **self.cond, **extra)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **_batched(self.cond, self.uncond), **extra)
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


class LatentBlendDenoiser:
    """Inpainting for ordinary checkpoints: outside the mask the prediction of x0 is the
    original latent itself, so every sampler step keeps the known region and the final
    x0 equals the input latent there exactly.

    mask: (B, 1, h, w) in [0, 1] at latent resolution, 1 = repaint.
    """

    def __init__(self, inner, known_latent: torch.Tensor, mask: torch.Tensor):
        self.inner, self.known, self.mask = inner, known_latent, mask
        self.kind = inner.kind

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        x0 = self.inner(x, sigma, **extra)
        return x0 * self.mask + self.known * (1 - self.mask)
