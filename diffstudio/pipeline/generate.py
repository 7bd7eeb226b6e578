"""The one generation loop, for every family.

txt2img, img2img (init image + strength) and inpainting (a mask) differ only in how
the start latent and the sigma schedule are shaped, and in a denoiser wrapper; the
sampling itself is the same call for all of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffstudio.conditioning.lora_tags import PromptLoRAs, split_lora_tags
from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.patches.apply import lora_recipe
from diffstudio.pipeline.denoiser import make_denoiser
from diffstudio.pipeline.guidance import CFGDenoiser, LatentBlendDenoiser
from diffstudio.pipeline.regions import region_denoiser, region_recipe


@dataclass
class Recipe:
    """Everything needed to make the same image again; stored in the PNG."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str
    scheduler: str
    family: str
    model: str = ""
    clip_skip: int = 1
    strength: float | None = None
    sigmas: list[float] | None = None
    guidance: float | None = None
    batch_index: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def check_size(width: int, height: int, multiple: int) -> None:
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        lower = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
        raise InvalidSizeError(f"{width}x{height} is not a size this model can take: width and height must be "
                               f"positive multiples of {multiple} (e.g. {lower[0]}x{lower[1]})")


class Pipeline:
    """``Pipeline(models)(prompt, ...) -> list[PIL.Image]`` for any family."""

    def __init__(self, models):
        self.models = models
        self.family = models.family
        self.lora_dirs: list = []  # folders where <lora:name:w> prompt tags are looked up (lora_tags.py)
        self.prompt_loras = PromptLoRAs()  # the LoRAs those tags applied, kept while the tags stay the same

    # -- pieces -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negatives: list[str], clip_skip: int, **options) -> tuple[dict, dict]:
        """Both prompt lists in one encoder batch, so their token lengths are padded alike.

        ``options`` (width, height, guidance) reach the family's make_conditioning: SDXL embeds the
        image size, FLUX dev the distilled guidance scale."""
        cond = self.family.make_conditioning(self.models, prompts + negatives, clip_skip=clip_skip,
                                             n_positive=len(prompts), **options)
        n = len(prompts)
        split = {k: (v[:n], v[n:]) if isinstance(v, torch.Tensor) else (v, v) for k, v in cond.items()}
        return {k: a for k, (a, _) in split.items()}, {k: b for k, (_, b) in split.items()}

    def encode_images(self, images: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        from diffstudio.pipeline.tiled_vae import encode

        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            latent = encode(vae, images.to(dtype=dtype), tiled=tiled).float()
        return self.family.latent.to_model(latent)

    def decode_latents(self, z: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        from diffstudio.pipeline.tiled_vae import decode

        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            return decode(vae, self.family.latent.from_model(z).to(dtype), tiled=tiled).float()

    # -- the loop ---------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                 scheduler: str | None = None, sigmas=None, batch_size: int = 1, init_image=None,
                 strength: float = 0.75, mask=None, clip_skip: int | None = None,
                 tiled_vae: bool | None = None, guidance: float | None = None, progress: bool = True,
                 callback=None, regions=None, region_mode: str = "latent") -> list[Image.Image]:
        from diffstudio.io.images import images_to_tensor, load_image, load_mask, tensor_to_images
        from diffstudio.sampling import get_sampler
        from diffstudio.sampling.noise import SeededNoise
        from diffstudio.sampling.schedules import get_sigmas, sigmas_for_strength, validate_sigmas

        fam = self.family
        d = replace(fam.defaults, **getattr(self.models, "defaults", {}))
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if init_image is not None and (width is None or height is None):
            w0, h0 = load_image(init_image).size
            width, height = w0 if width is None else width, h0 if height is None else height
        width, height = d.width if width is None else width, d.height if height is None else height
        check_size(width, height, fam.latent.downscale)
        steps = steps or d.steps
        cfg_scale = d.cfg_scale if cfg_scale is None else cfg_scale
        sampler, scheduler = sampler or d.sampler, scheduler or d.scheduler
        clip_skip = clip_skip or fam.text_encoders[0].default_clip_skip
        guidance = d.guidance if guidance is None else guidance
        sample = get_sampler(sampler)
        n = len(prompts)
        started = time.time()

        texts, tags = split_lora_tags(prompts + negatives)  # <lora:...> tags out; the recipe keeps them
        self.prompt_loras.update(self.models, tags, self.lora_dirs)
        with torch.inference_mode():
            cond, uncond = self.encode_prompts(texts[:n], texts[n:], clip_skip, width=width, height=height,
                                               guidance=guidance)
        lat_shape = (fam.latent.channels, height // fam.latent.downscale, width // fam.latent.downscale)
        denoiser = make_denoiser(self.models, lat_shape[1:])
        if sigmas is not None:
            sigma_list = validate_sigmas(sigmas)
        else:
            sigma_list = get_sigmas(scheduler, denoiser, steps)

        noise = SeededNoise([seed + i for i in range(n)], lat_shape, dtype=torch.float32, device="cpu")
        x_noise = noise.initial()

        known = None
        if init_image is not None:
            image = load_image(init_image).resize((width, height), Image.LANCZOS)
            pixels = images_to_tensor([image] * n)
            known = self.encode_images(pixels, tiled_vae)
            if sigmas is None:
                sigma_list = sigmas_for_strength(sigma_list, strength)
        pixel_mask = latent_mask = None
        if mask is not None:
            if known is None:
                raise InvalidInputError("a mask needs an init_image: the mask says which part of that image to "
                                        "repaint; pass init_image= (CLI: --init-image)")
            pixel_mask = load_mask(mask, (width, height))
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=lat_shape[1:], mode="bilinear",
                                                          align_corners=False).expand(n, 1, *lat_shape[1:])
        concat = fam.concat_channels(self.models.configs[fam.denoiser_role])
        if concat:  # an inpainting denoiser conditions on (mask, masked image latent) itself
            cond_mask = latent_mask if latent_mask is not None else torch.ones(n, 1, *lat_shape[1:])
            if known is not None and pixel_mask is not None:
                masked = self.encode_images(pixels * (pixel_mask < 0.5), tiled_vae)
            else:
                masked = self.encode_images(torch.zeros(n, 3, height, width), tiled_vae)
            c_concat = torch.cat([cond_mask, masked], dim=1)
            cond, uncond = {**cond, "c_concat": c_concat}, {**uncond, "c_concat": c_concat}

        if regions:  # a prompt per area (pipeline/regions.py, docs/regions.md)
            guided = region_denoiser(self, denoiser, regions, region_mode, cond, uncond, prompts=texts[:n],
                                     negatives=texts[n:], cfg_scale=cfg_scale, clip_skip=clip_skip, width=width,
                                     height=height, guidance=guidance)
        else:
            guided = CFGDenoiser(denoiser, cond, uncond, cfg_scale)
        if latent_mask is not None and not concat:
            guided = LatentBlendDenoiser(guided, known, latent_mask)

        if known is not None:
            x = denoiser.noise_scaling(sigma_list[0], x_noise, known)
        else:
            x = denoiser.noise_scaling(sigma_list[0], x_noise, torch.zeros_like(x_noise))

        bar = tqdm(total=len(sigma_list) - 1, desc=f"{fam.name} {sampler}", disable=not progress, leave=False)

        def on_step(i, total, x_i, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, total, x_i, denoised)

        with torch.inference_mode():
            z = sample(guided, x, sigma_list, callback=on_step, noise=noise)
        bar.close()
        pixels_out = self.decode_latents(z, tiled_vae)
        if pixel_mask is not None:  # keep the untouched pixels bit-exact outside the mask
            pixels_out = pixels_out * pixel_mask + pixels * (1 - pixel_mask)
        images = tensor_to_images(pixels_out)

        model_name = self.models.sources.get(fam.denoiser_role, "")
        for i, image in enumerate(images):
            recipe = Recipe(prompts[i], negatives[i], width, height, steps, cfg_scale, seed + i,
                            sampler, scheduler, fam.name, model=str(model_name).split("/")[-1],
                            clip_skip=clip_skip, strength=strength if init_image is not None else None,
                            sigmas=[float(s) for s in sigma_list] if sigmas is not None else None,
                            guidance=guidance, batch_index=i, extra={"seconds": round(time.time() - started, 2),
                                                                 **region_recipe(regions, region_mode),
                                                                 **lora_recipe(self.models)})
            image.info["diffstudio_recipe"] = recipe.to_dict()
        return images
