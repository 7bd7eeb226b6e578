"""Previews of a run's x0 estimate while it samples, for a sampler callback.

The samplers report ``callback(i, total, x, denoised)`` after each step; ``denoised`` is the denoiser's
current estimate of the clean latent (x0). ``preview_image(pipe, denoised)`` decodes the first image's
estimate with the model's own VAE and scales it down to at most ``max_side`` pixels on its longer side.

Why the VAE and not a fixed linear latent -> RGB map (A1111's and ComfyUI's "approx" previews): a map
``rgb = W z + b`` fitted by least squares to the demo model's VAE misses the decoded colours by 58 of 255 on
average (fitted on flat colour blocks it encoded) and still by 36 of 255 when fitted on six of the demo's
generated images and measured on six others: its small VAE is not close to linear per latent pixel. A decode
is exact for every family and VAE; it costs one VAE decode per preview, so previews are asked for, every ``n``
steps, and a run without them pays nothing.
"""

from __future__ import annotations

import torch
from PIL import Image

MAX_SIDE = 512


def preview_image(pipe, denoised: torch.Tensor, max_side: int = MAX_SIDE) -> Image.Image:
    """The first image of ``denoised`` (B, C, h, w) decoded by ``pipe``'s VAE, at most ``max_side`` pixels on
    its longer side (aspect ratio kept)."""
    from diffstudio.io.images import tensor_to_images

    image = tensor_to_images(pipe.decode_latents(denoised[:1], None))[0]
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    return image
