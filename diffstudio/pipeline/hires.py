"""Hires fix (A1111's "Hires. fix"): an image larger than the model was trained for, without repeated subjects.

A first pass draws the picture at the request's size; its result is upscaled — in latent space
("latent": bilinear, or "latent-nearest") or in pixels ("lanczos": decoded, resized, encoded again) — and a
second, img2img pass at the target size repaints it with ``strength`` of the schedule, adding the detail the
upscale lacks. A1111's parameters: ``hr_scale`` = ``scale``, ``hr_upscaler`` = ``upscaler``,
``denoising_strength`` = ``strength``, ``hr_second_pass_steps`` = ``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from diffstudio.errors import InvalidInputError

UPSCALERS = ("latent", "latent-nearest", "lanczos")


@dataclass
class HiresFix:
    scale: float = 2.0
    upscaler: str = "latent"
    strength: float = 0.55
    steps: int | None = None  # the second pass's steps (default: the request's)

    def __post_init__(self):
        if self.upscaler not in UPSCALERS:
            raise InvalidInputError(f"unknown hires upscaler {self.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        if not self.scale >= 1.0:
            raise InvalidInputError(f"the hires scale must be >= 1, got {self.scale}")

    def recipe(self, first_size: tuple[int, int]) -> dict:
        return {"hires": {"scale": self.scale, "upscaler": self.upscaler, "strength": self.strength,
                          "steps": self.steps, "first_pass": list(first_size)}}


def hires_run(pipe, request, hires: HiresFix, *, modules=(), progress: bool = True, callback=None):
    """The two passes of ``request`` (see the module doc); returns the second pass's images."""
    gen, z = pipe.sample(request, modules=modules, progress=progress, callback=callback)
    first, down = gen.request, pipe.family.latent.downscale
    width, height = (round(first.width * hires.scale / down) * down, round(first.height * hires.scale / down) * down)
    second = replace(request, width=width, height=height, strength=hires.strength,
                     steps=hires.steps or gen.request.steps, sigmas=None)
    if hires.upscaler == "lanczos":
        from diffstudio.io.images import tensor_to_images

        pictures = tensor_to_images(pipe.decode_latents(z, first.tiled_vae))
        if len(pictures) > 1:  # one init image per call: the batch goes through one image at a time
            raise InvalidInputError("the lanczos hires upscaler takes batch_size 1; use the latent upscaler for "
                                    "batches")
        second = replace(second, init_image=pictures[0].resize((width, height), Image.LANCZOS))
    else:
        mode = "bilinear" if hires.upscaler == "latent" else "nearest-exact"
        with torch.inference_mode():
            upscaled = F.interpolate(z, size=(height // down, width // down), mode=mode)
        second = replace(second, init_latent=upscaled)
    images = pipe.run(second, modules=modules, progress=progress, callback=callback)
    for image in images:
        image.info["diffstudio_recipe"]["extra"].update(hires.recipe((first.width, first.height)))
    return images
