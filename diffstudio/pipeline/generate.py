"""The one generation loop, for every family, as stages:

    request (resolved against family and model defaults)
      -> prompts encoded once          (the family's make_conditioning, in one batch with the negatives)
      -> start latent                  txt2img | img2img | inpaint   (start.py)
      -> denoiser                      the network's, wrapped by the run's modules in order (modules.py):
                                       [ControlNet, IP-Adapter, ...]  CFG | regions  [windows]  inpaint blend
      -> sampler                       a pure function over the sigmas (sampling/)
      -> decode, finish, recipe

``Pipeline(models)(prompt, ...)`` is the convenient front; ``Pipeline.run(request, modules=[...])``
takes a ``Request`` and extra denoiser modules.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffstudio.conditioning.lora_tags import PromptLoRAs, split_lora_tags
from diffstudio.patches.apply import lora_recipe
from diffstudio.pipeline.denoiser import make_denoiser
from diffstudio.pipeline.modules import ClassifierFreeGuidance, Generation, RegionPrompts, compose
from diffstudio.pipeline.request import Request, check_size  # noqa: F401 (check_size: part of this module's face)
from diffstudio.pipeline.start import concat_conditioning, start_for


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



def encode_to_latent(models, images: torch.Tensor, tiled: bool | None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> the denoiser's latents (the family's scale and shift applied), on the
    host (latents live there; modules move what they need to the device)."""
    from diffstudio.pipeline.tiled_vae import encode

    vae = models.vae
    dtype = next(vae.parameters()).dtype
    with torch.inference_mode():
        latent = encode(vae, images.to(dtype=dtype), tiled=tiled).float().cpu()
    return models.family.latent.to_model(latent)

class Pipeline:
    """``Pipeline(models)(prompt, ...) -> list[PIL.Image]`` for any family.

    ``<lora:name:w>`` prompt tags apply to a clone of ``models`` for that call only; ``models`` itself keeps
    the LoRAs applied to it with ``models.apply_lora``."""

    def __init__(self, models, lora_dirs=()):
        if models.family.own_pipeline:
            from diffstudio.errors import InvalidInputError

            raise InvalidInputError(f"{models.family.name} models run in {models.family.own_pipeline}, not the "
                                    "image Pipeline")
        self.models = models
        self.family = models.family
        self.lora_dirs: list = list(lora_dirs)  # folders where <lora:name:w> prompt tags are looked up
        self.prompt_loras = PromptLoRAs()  # the clone holding the tags' LoRAs, kept while the tags stay the same

    # -- pieces -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negatives: list[str], clip_skip: int, *, models=None,
                       **options) -> tuple[dict, dict]:
        """Both prompt lists in one encoder batch, so their token lengths are padded alike.

        ``options`` (width, height, guidance) reach the family's make_conditioning: SDXL embeds the
        image size, FLUX dev the distilled guidance scale."""
        models = self.models if models is None else models
        cond = self.family.make_conditioning(models, prompts + negatives, clip_skip=clip_skip,
                                             n_positive=len(prompts), **options)
        n = len(prompts)
        split = {k: (v[:n], v[n:]) if isinstance(v, torch.Tensor) else (v, v) for k, v in cond.items()}
        return {k: a for k, (a, _) in split.items()}, {k: b for k, (_, b) in split.items()}

    def encode_images(self, images: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        return encode_to_latent(self.models, images, tiled)

    def decode_latents(self, z: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        from diffstudio.pipeline.tiled_vae import decode

        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            return decode(vae, self.family.latent.from_model(z).to(dtype), tiled=tiled).float().cpu()

    # -- the front --------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                 scheduler: str | None = None, sigmas=None, batch_size: int = 1, init_image=None,
                 strength: float | None = None, mask=None, clip_skip: int | None = None,
                 tiled_vae: bool | None = None, guidance: float | None = None, progress: bool = True,
                 callback=None, regions=None, region_mode: str = "latent", controlnets=(), ip_adapter=None, hires=None,
                 modules=(), deep_cache: int | None = None, cfg_until: float | None = None,
                 token_merging: float | None = None) -> list[Image.Image]:
        """``controlnets``: ``ControlNetUnit``s (pipeline/control.py); ``ip_adapter``: an ``ImagePrompt`` or a list
        of them (pipeline/ip_adapter.py); ``hires``: a ``HiresFix`` (a second, img2img pass at a larger size:
        pipeline/hires.py); ``modules``: extra denoiser modules. Fewer network evaluations, quality trades, off by
        default: ``deep_cache`` = k reuses a UNet's deep features for k calls (pipeline/deep_cache.py);
        ``cfg_until`` = f guides only the first fraction f of the steps (pipeline/cfg_until.py); ``token_merging`` =
        r merges that share of the tokens of a UNet's high-resolution self-attention (ToMe,
        pipeline/token_merging.py)."""
        modules = list(modules)
        if token_merging:
            from diffstudio.pipeline.token_merging import TokenMergingModule

            modules.append(TokenMergingModule(token_merging))
        if deep_cache:
            from diffstudio.pipeline.deep_cache import DeepCache

            modules.append(DeepCache(deep_cache))
        if cfg_until is not None:
            from diffstudio.pipeline.cfg_until import CFGUntil

            modules.append(CFGUntil(cfg_until))
        if controlnets:
            from diffstudio.pipeline.control import ControlNets

            modules.append(ControlNets(controlnets))
        if ip_adapter:
            from diffstudio.pipeline.ip_adapter import ImagePrompts

            modules.append(ImagePrompts(ip_adapter if isinstance(ip_adapter, (list, tuple)) else [ip_adapter]))
        request = Request(prompt, negative_prompt, width=width, height=height, steps=steps, cfg_scale=cfg_scale,
                          seed=seed, sampler=sampler, scheduler=scheduler, sigmas=sigmas, batch_size=batch_size,
                          init_image=init_image, strength=strength, mask=mask, clip_skip=clip_skip,
                          tiled_vae=tiled_vae, guidance=guidance, regions=regions, region_mode=region_mode)
        if hires is not None:  # two passes: pipeline/hires.py
            from diffstudio.pipeline.hires import hires_run

            return hires_run(self, request, hires, modules=modules, progress=progress, callback=callback)
        return self.run(request, modules=modules, progress=progress, callback=callback)

    # -- the loop ---------------------------------------------------------------------------
    def prepare(self, request: Request, modules=(), start=None) -> Generation:
        """Everything before sampling: the request resolved, prompts encoded, the start prepared and the
        network's denoiser wrapped by the run's modules (``gen.guided``). ``start``: a start-latent strategy
        (start.py) in place of the one the request implies (the video pipeline's frames)."""
        from diffstudio.sampling import get_sigmas

        r = request.resolve(self.models)
        fam, n = self.family, len(r.prompts)
        texts, tags = split_lora_tags(r.prompts + r.negatives)  # <lora:...> tags out; the recipe keeps them
        models = self.prompt_loras.models_for(self.models, tags, self.lora_dirs).activate()

        def encode(ps: list[str], ns: list[str]) -> tuple[dict, dict]:
            return self.encode_prompts(ps, ns, r.clip_skip, models=models, width=r.width, height=r.height,
                                       guidance=r.guidance)

        with torch.inference_mode():
            cond, uncond = encode(texts[:n], texts[n:])
        lat_shape = (fam.latent.channels, r.height // fam.latent.downscale, r.width // fam.latent.downscale)
        denoiser = make_denoiser(models, lat_shape[1:])
        sigmas = r.sigmas if r.sigmas is not None else get_sigmas(r.scheduler, denoiser, r.steps)
        gen = Generation(models, r, denoiser, sigmas, cond, uncond, encode, texts[:n], texts[n:], lat_shape)
        gen.start = start_for(r) if start is None else start
        gen.modules = [*gen.start.prepare(gen, self), *modules]
        concat_conditioning(gen, self)
        gen.modules.append(RegionPrompts(r.regions, r.region_mode) if r.regions else ClassifierFreeGuidance())
        gen.guided = compose(denoiser, gen.modules, gen)
        return gen

    def sample(self, request: Request, *, modules=(), progress: bool = True,
               callback=None) -> tuple[Generation, torch.Tensor]:
        """Prepare and sample ``request``: (the run's Generation, the final latents in the model's latent space)."""
        from diffstudio.sampling import get_sampler
        from diffstudio.sampling.noise import SeededNoise

        gen = self.prepare(request, modules)
        r, n = gen.request, len(gen.prompts)
        noise = SeededNoise([r.seed + i for i in range(n)], gen.latent_shape, dtype=torch.float32, device="cpu")
        x = gen.start.start(gen, noise.initial())
        bar = tqdm(total=len(gen.sigmas) - 1, desc=f"{self.family.name} {r.sampler}", disable=not progress,
                   leave=False)

        def on_step(i, total, x_i, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, total, x_i, denoised)

        with torch.inference_mode():
            z = get_sampler(r.sampler)(gen.guided, x, gen.sigmas, callback=on_step, noise=noise)
        bar.close()
        return gen, z

    def run(self, request: Request, *, modules=(), progress: bool = True, callback=None) -> list[Image.Image]:
        """Generate the images of ``request``; ``modules`` are extra denoiser modules (modules.py)."""
        from diffstudio.io.images import tensor_to_images

        started = time.time()
        gen, z = self.sample(request, modules=modules, progress=progress, callback=callback)
        r, fam = gen.request, self.family
        images = tensor_to_images(gen.start.finish(gen, self.decode_latents(z, r.tiled_vae)))

        extra = {"seconds": round(time.time() - started, 2), **lora_recipe(gen.models)}
        for module in gen.modules:
            extra.update(getattr(module, "recipe", dict)())
        model_name = str(gen.models.sources.get(fam.denoiser_role, "")).split("/")[-1]
        for i, image in enumerate(images):
            recipe = Recipe(r.prompts[i], r.negatives[i], r.width, r.height, r.steps, r.cfg_scale, r.seed + i,
                            r.sampler, "custom" if request.sigmas is not None else r.scheduler, fam.name,
                            model=model_name, clip_skip=r.clip_skip, strength=r.strength,
                            sigmas=[float(s) for s in r.sigmas] if r.sigmas is not None else None,
                            guidance=r.guidance, batch_index=i, extra=extra)
            image.info["diffstudio_recipe"] = recipe.to_dict()
        return images
