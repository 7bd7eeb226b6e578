"""What the user asked for, resolved against the family's and the model's defaults and checked.

``Request(...)`` holds the arguments as given (``None`` = "the default"); ``request.resolve(models)``
returns a copy where every field has its value, the init image and the mask are read once, and every
value a user can get wrong has raised a named error (``InvalidInputError``, ``InvalidSizeError``)
that says what to pass instead. Nothing is silently ignored or reinterpreted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffstudio.errors import InvalidInputError, InvalidSizeError


def check_size(width: int, height: int, multiple: int) -> None:
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        lower = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
        raise InvalidSizeError(f"{width}x{height} is not a size this model can take: width and height must be "
                               f"positive multiples of {multiple} (e.g. {lower[0]}x{lower[1]})")


@dataclass
class Request:
    """One generation: prompts, size, sampling, and the optional inputs (init image, mask, regions)."""

    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = 0
    sampler: str | None = None
    scheduler: str | None = None
    sigmas: Any = None  # a custom schedule (overrides steps and scheduler)
    batch_size: int = 1
    init_image: Any = None
    strength: float | None = None  # img2img: default 0.75; only with an init image (or init latent)
    mask: Any = None
    clip_skip: int | None = None
    tiled_vae: bool | None = None
    guidance: float | None = None
    regions: Any = None
    region_mode: str = "latent"
    init_latent: Any = None  # img2img from latents in the model's latent space, (1 or B, C, h, w): hires fix

    # -- resolved views -----------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return [self.prompt] * self.batch_size if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negatives(self) -> list[str]:
        n = len(self.prompts)
        return [self.negative_prompt] * n if isinstance(self.negative_prompt, str) else list(self.negative_prompt)

    def resolve(self, models) -> Request:
        """A copy with every default filled in and every value checked (see the module doc)."""
        from diffstudio.io.images import load_image, load_mask
        from diffstudio.sampling import SAMPLERS, SCHEDULERS, validate_sigmas

        fam = models.family
        d = replace(fam.defaults, **getattr(models, "defaults", {}))
        r = replace(self)
        if r.batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {r.batch_size}")
        if not isinstance(r.prompt, str):
            if not r.prompt:
                raise InvalidInputError("prompt is an empty list; pass a string or at least one prompt")
            r.batch_size = len(r.prompt)
        if len(r.negatives) != len(r.prompts):
            raise InvalidInputError(f"{len(r.negatives)} negative prompts for {len(r.prompts)} prompts; "
                                    "pass one string or one per prompt")
        if r.init_image is not None and r.init_latent is not None:
            raise InvalidInputError("pass an init_image or an init_latent, not both")
        if r.init_image is not None:
            r.init_image = load_image(r.init_image)  # read once: the size defaults come from it
            w0, h0 = r.init_image.size
            r.width, r.height = w0 if r.width is None else r.width, h0 if r.height is None else r.height
        elif r.init_latent is not None:
            _check_init_latent(r, fam)
        elif r.strength is not None:
            raise InvalidInputError("strength is how much of an init image to repaint; it needs init_image= "
                                    "(CLI: --init-image)")
        r.width = d.width if r.width is None else r.width
        r.height = d.height if r.height is None else r.height
        check_size(r.width, r.height, fam.latent.downscale)
        if r.init_image is not None or r.init_latent is not None:
            r.strength = 0.75 if r.strength is None else float(r.strength)
            if not 0.0 < r.strength <= 1.0:
                raise InvalidInputError(f"strength must be in (0, 1] (1 = repaint everything), got {r.strength}")
        if r.mask is not None:
            if r.init_image is None:  # (an init latent has no pixels to paste back outside the mask)
                raise InvalidInputError("a mask needs an init_image: the mask says which part of that image to "
                                        "repaint; pass init_image= (CLI: --init-image)")
            r.mask = _mask_for(load_mask(r.mask), r.width, r.height)
        r.steps = d.steps if r.steps is None else r.steps
        if r.sigmas is not None:
            r.sigmas = validate_sigmas(r.sigmas)
            r.steps = len(r.sigmas) - 1
        elif not isinstance(r.steps, int) or r.steps < 1:
            raise InvalidInputError(f"steps must be a positive whole number, got {r.steps!r}")
        r.cfg_scale = d.cfg_scale if r.cfg_scale is None else float(r.cfg_scale)
        r.sampler, r.scheduler = r.sampler or d.sampler, r.scheduler or d.scheduler
        if r.sampler not in SAMPLERS:
            raise InvalidInputError(f"unknown sampler {r.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if r.sigmas is None and r.scheduler not in SCHEDULERS:
            raise InvalidInputError(f"unknown scheduler {r.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        r.clip_skip = _check_clip_skip(models, r.clip_skip)
        r.guidance = d.guidance if r.guidance is None else r.guidance
        return r


def _check_init_latent(r: Request, fam) -> None:
    """An init latent fixes the size; it has the model's latent channels and one row or one per image."""
    latent = r.init_latent
    down = fam.latent.downscale
    if latent.ndim != 4 or latent.shape[1] != fam.latent.channels or latent.shape[0] not in (1, len(r.prompts)):
        raise InvalidInputError(f"an init latent must be (1 or {len(r.prompts)}, {fam.latent.channels}, h, w) for "
                                f"{fam.name}, got {tuple(latent.shape)}")
    size = (latent.shape[-1] * down, latent.shape[-2] * down)
    if (r.width or size[0], r.height or size[1]) != size:
        raise InvalidInputError(f"the init latent is {size[0]}x{size[1]} pixels but {r.width}x{r.height} was asked")
    r.width, r.height = size


def _mask_for(mask, width: int, height: int):
    """The mask at the output size: resized when only the scale differs, refused when the aspect ratio does
    (stretching would move the repainted area)."""
    import torch.nn.functional as F

    h, w = mask.shape[-2:]
    if (w, h) == (width, height):
        return mask
    if abs(w / h - width / height) > 0.01:
        raise InvalidInputError(f"the mask is {w}x{h} but the image is {width}x{height}: a mask of another aspect "
                                "ratio would be stretched; pass a mask of the image's shape")
    return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)


def _check_clip_skip(models, clip_skip: int | None) -> int:
    """1 = the last layer; n = the n-th from last. At most the encoder's depth."""
    fam = models.family
    value = fam.text_encoders[0].default_clip_skip if clip_skip is None else clip_skip
    if not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"clip_skip must be a whole number >= 1 (1 = the last layer), got {value!r}")
    for spec in fam.text_encoders:
        if not spec.tokenizer_data.startswith("clip"):
            continue  # clip skip applies to the CLIP encoders only
        config = models.configs.get(spec.encoder_role)
        depth = getattr(getattr(config, "text_config", config), "num_hidden_layers", None)
        if depth is not None and value > depth:
            raise InvalidInputError(f"clip_skip {value} is deeper than the {spec.encoder_role} text encoder "
                                    f"({depth} layers); use 1..{depth}")
    return value
