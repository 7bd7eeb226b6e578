"""What Stable Video Diffusion is conditioned on, computed from the input image.

* The CLIP image embedding: the image, in [-1, 1], resized to the encoder's input (224 x 224 for ViT-H/14, the
  whole image, aspect not kept) after a Gaussian blur against aliasing, then normalised with CLIP's mean and std;
  the projected embedding (``image_embeds``) is the UNet's one cross-attention token. generative-models resizes
  with kornia's antialiased resize: blur with sigma = (factor - 1) / 2 per axis, kernel 2 * 2 * sigma rounded
  up to odd (at least 3), reflect padding, then bicubic interpolation with aligned corners.
* The first-frame latent: the image plus ``noise_aug_strength`` * N(0, I) noise, encoded by the VAE (mean, not
  scaled by the latent scale factor), concatenated to the noisy latent of every frame.
* The added time ids: (fps - 1, motion bucket id, noise_aug_strength), each embedded by the UNet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffstudio.pipeline.ip_adapter import CLIP_MEAN, CLIP_STD, image_features


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-x.pow(2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """1-D depthwise convolution along H (axis 2) or W (axis 3) with reflect padding."""
    size = kernel.numel()
    front = (size - 1) // 2
    pad = (front, size - 1 - front, 0, 0) if axis == 3 else (0, 0, front, size - 1 - front)
    c = x.shape[1]
    weight = kernel.to(x).view(1, 1, *((1, size) if axis == 3 else (size, 1))).expand(c, 1, -1, -1)
    return F.conv2d(F.pad(x, pad, mode="reflect"), weight, groups=c)


def antialiased_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size[0], size[1]): Gaussian blur against aliasing, then bicubic (aligned corners)."""
    h, w = images.shape[-2:]
    sigmas = [max((h / size[0] - 1.0) / 2.0, 0.001), max((w / size[1] - 1.0) / 2.0, 0.001)]
    sizes = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
    sizes = [k + 1 if k % 2 == 0 else k for k in sizes]
    out = _blur_axis(images, _gaussian_kernel(sizes[1], sigmas[1]), axis=3)
    out = _blur_axis(out, _gaussian_kernel(sizes[0], sigmas[0]), axis=2)
    return F.interpolate(out, size=size, mode="bicubic", align_corners=True)


def clip_image_embedding(encoder, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> projected CLIP embeddings (B, 1, P) for the UNet's cross-attention."""
    side = int(encoder.config.image_size)
    pixels = (antialiased_resize(images.float(), (side, side)) + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return image_features(encoder, (pixels - mean) / std, "image_embeds")[:, None, :]


def added_time_ids(fps: float, motion_bucket_id: float, noise_aug_strength: float) -> torch.Tensor:
    """(1, 3): what the UNet's added-time embedding reads. The model is told fps - 1, as it was trained."""
    if not fps >= 1 or not math.isfinite(fps):
        from diffstudio.errors import InvalidInputError
        raise InvalidInputError(f"fps must be at least 1, got {fps}")
    return torch.tensor([[fps - 1.0, float(motion_bucket_id), float(noise_aug_strength)]])
