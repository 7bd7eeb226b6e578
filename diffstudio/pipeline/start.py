"""Start-latent strategies: where sampling begins, and what happens to the pixels at the end.

* ``TextToImage`` — pure noise at the schedule's first sigma.
* ``ImageToImage`` — the init image's latent noised to the level ``strength`` picks: the schedule keeps
  its last ``strength`` fraction of steps (A1111's img2img).
* ``Inpaint`` — img2img inside a mask: an inpainting checkpoint (extra input channels) reads the mask
  and the masked image itself; an ordinary one gets the ``InpaintBlend`` module (x0 outside the mask is
  the known latent), and the untouched pixels are pasted back after decoding, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from diffstudio.pipeline.modules import Generation, InpaintBlend


class TextToImage:
    def prepare(self, gen: Generation, pipe) -> list:
        """Fill in what this start needs on ``gen``; returns the denoiser modules it adds."""
        return []

    def start(self, gen: Generation, noise: torch.Tensor) -> torch.Tensor:
        return gen.denoiser.noise_scaling(gen.sigmas[0], noise, torch.zeros_like(noise))

    def finish(self, gen: Generation, pixels: torch.Tensor) -> torch.Tensor:
        return pixels


class ImageToImage(TextToImage):
    def prepare(self, gen: Generation, pipe) -> list:
        from diffstudio.io.images import images_to_tensor
        from diffstudio.sampling.schedules import sigmas_for_strength

        r = gen.request
        if r.init_latent is not None:  # already in the model's latent space (hires fix)
            gen.known = r.init_latent.float().expand(len(gen.prompts), -1, -1, -1)
        else:
            image = r.init_image.resize((r.width, r.height), Image.LANCZOS)
            gen.pixels = images_to_tensor([image] * len(gen.prompts))
            gen.known = pipe.encode_images(gen.pixels, r.tiled_vae)
        if r.sigmas is None:  # a custom schedule is taken as given
            gen.sigmas = sigmas_for_strength(gen.sigmas, r.strength)
        return []

    def start(self, gen: Generation, noise: torch.Tensor) -> torch.Tensor:
        return gen.denoiser.noise_scaling(gen.sigmas[0], noise, gen.known)


class Inpaint(ImageToImage):
    def prepare(self, gen: Generation, pipe) -> list:
        super().prepare(gen, pipe)
        n, (_, h, w) = len(gen.prompts), gen.latent_shape
        gen.pixel_mask = gen.request.mask
        gen.latent_mask = F.interpolate(gen.pixel_mask, size=(h, w), mode="bilinear",
                                        align_corners=False).expand(n, 1, h, w)
        if _takes_mask_channels(gen):  # the checkpoint inpaints by itself
            return []
        return [InpaintBlend()]

    def finish(self, gen: Generation, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * gen.pixel_mask + gen.pixels * (1 - gen.pixel_mask)  # untouched pixels stay exact


def _takes_mask_channels(gen: Generation) -> bool:
    fam = gen.family
    return bool(fam.concat_channels(gen.models.configs[fam.denoiser_role]))


def concat_conditioning(gen: Generation, pipe) -> None:
    """Inpainting checkpoints (9 input channels) condition on (mask, masked image latent) in every run:
    txt2img gives them a full mask and an empty image."""
    if not _takes_mask_channels(gen):
        return
    n, (_, h, w) = len(gen.prompts), gen.latent_shape
    r = gen.request
    mask = gen.latent_mask if gen.latent_mask is not None else torch.ones(n, 1, h, w)
    if gen.known is not None and gen.pixel_mask is not None:
        masked = pipe.encode_images(gen.pixels * (gen.pixel_mask < 0.5), r.tiled_vae)
    else:
        masked = pipe.encode_images(torch.zeros(n, 3, r.height, r.width), r.tiled_vae)
    c_concat = torch.cat([mask, masked], dim=1)
    gen.cond, gen.uncond = {**gen.cond, "c_concat": c_concat}, {**gen.uncond, "c_concat": c_concat}


def start_for(request) -> TextToImage:
    if request.mask is not None:
        return Inpaint()
    if request.init_image is not None or request.init_latent is not None:
        return ImageToImage()
    return TextToImage()
