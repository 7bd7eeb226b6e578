"""Image prompts (IP-Adapter, Ye et al. 2023) as a denoiser module.

Each ``ImagePrompt`` is one or more reference images, a scale, and the fraction of the steps it acts on. When
the run is prepared the module encodes the references once: CLIP features of each image (``image_embeds`` for
the base adapters, penultimate hidden states for Plus / full-face), their weighted mean, and the adapter's
image tokens of that mean. The unconditional rows get the tokens of the "zero image", as the IP-Adapter
release and diffusers do: a zero embedding for the base adapters, the encoder's features of an all-zero
(normalised) pixel input for the hidden-state adapters; XLabs' FLUX adapter gets the features of a black
picture, as diffusers' FluxPipeline gives it (``adapter.unconditional_reference``). At the network stage the
module hands the network its ``ip`` hook (the UNet's, models/unet.py: per cross-attention layer; the FLUX
transformer's, models/flux.py: per double block) the keys and values of each active prompt's tokens and its
scale.

``style_only`` (InstantStyle, Wang et al. 2024) gives the tokens to the style blocks only
(`models.ipadapter.style_blocks`); ``blocks`` names the layers directly (diffusers block names, e.g.
``["up_blocks.0.attentions.1", "down_blocks.2.attentions.1"]`` for InstantStyle's style + layout; BFL's
``double_blocks.N`` for FLUX).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffstudio.errors import InvalidInputError, IPAdapterMismatchError
from diffstudio.models.ipadapter import CLIP_MEAN, CLIP_STD
from diffstudio.pipeline.modules import NEGATIVE_ROWS, NETWORK, Generation, Wrapper, is_active, mark_negative_rows


@dataclass
class ImagePrompt:
    """Reference images that prompt the generation through an IP-Adapter.

    images: one image or a list (paths, PIL images, arrays, tensors); several are combined as the weighted mean
    of their CLIP features (``weights``, default equal). scale: the weight of the image attention (0 = off).
    style_only: the tokens reach the style blocks only (InstantStyle). start / end: the fraction of the steps
    during which the prompt acts (0 = first step, 1 = last). model: a loaded adapter
    (``models.add_ip_adapter(...)``), a path to one, or None for the one adapter added to the model. blocks:
    the layers that receive the tokens, as diffusers block names (None = all; overrides ``style_only``).
    """

    images: Any
    scale: float = 0.7
    weights: Sequence[float] | None = None
    style_only: bool = False
    start: float = 0.0
    end: float = 1.0
    model: Any = None
    blocks: Sequence[str] | None = None

    def __post_init__(self):
        if isinstance(self.images, (str, bytes)) or not isinstance(self.images, (list, tuple)):
            self.images = [self.images]
        self.images = list(self.images)
        if not self.images:
            raise InvalidInputError("an ImagePrompt needs at least one image")
        if not math.isfinite(float(self.scale)):
            raise InvalidInputError(f"an ImagePrompt's scale must be a finite number, got {self.scale}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InvalidInputError(f"an ImagePrompt needs 0 <= start <= end <= 1, got {self.start}..{self.end}")
        if self.weights is not None:
            weights = [float(w) for w in self.weights]
            if len(weights) != len(self.images) or any(w < 0 or not math.isfinite(w) for w in weights) or \
                    sum(weights) <= 0:
                raise InvalidInputError(f"ImagePrompt weights must be one non-negative number per image "
                                        f"({len(self.images)}) with a positive sum; got {list(self.weights)}")
            self.weights = weights
        if self.blocks is not None:
            self.blocks = [self.blocks] if isinstance(self.blocks, str) else list(self.blocks)

    def describe(self) -> dict:
        model = self.model if isinstance(self.model, (str, type(None))) else getattr(self.model, "source", "")
        out = {"scale": self.scale, "images": [str(i).split("/")[-1] if isinstance(i, str) else type(i).__name__
                                              for i in self.images], "start": self.start, "end": self.end}
        if model:
            out["model"] = str(model).split("/")[-1]
        if self.weights is not None:
            out["weights"] = self.weights
        if self.style_only:
            out["style_only"] = True
        if self.blocks is not None:
            out["blocks"] = self.blocks
        return out


# -- encoding the references ------------------------------------------------------------------------

def fit_reference(image, size: int) -> torch.Tensor:
    """An image -> uint8 (3, size, size): the shorter side scaled to ``size`` (bicubic), centre-cropped (what
    CLIPImageProcessor does before it normalises)."""
    from diffstudio.io.images import load_image

    picture = load_image(image)
    short, long = sorted(picture.size)
    scaled = (size, int(size * long / short))
    picture = picture.resize(scaled if picture.width <= picture.height else scaled[::-1], Image.BICUBIC)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    picture = picture.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1)


def normalise_reference(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float CLIP input: scaled to [0, 1], normalised with CLIP's mean and std."""
    view = (3, 1, 1)
    return (pixels.float() / 255.0 - torch.tensor(CLIP_MEAN).view(view)) / torch.tensor(CLIP_STD).view(view)


def clip_pixels(image, size: int) -> torch.Tensor:
    """An image -> (3, size, size) CLIP input (`fit_reference`, then `normalise_reference`)."""
    return normalise_reference(fit_reference(image, size))


def image_features(encoder, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """CLIP features of (B, 3, S, S) pixels: ``image_embeds`` (B, E) or penultimate hidden states (B, T, E)."""
    param = next(encoder.parameters())
    out = encoder(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=kind == "penultimate")
    return (out.image_embeds if kind == "image_embeds" else out.hidden_states[-2]).float()


def reference_tokens(loaded, images: list, weights: list[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image tokens of the references' weighted mean feature, of the zero image), each (1, N, D)."""
    kind = loaded.adapter.config.image_features
    pixels = torch.stack([clip_pixels(image, loaded.image_size) for image in images])
    with torch.inference_mode():
        features = image_features(loaded.image_encoder, pixels, kind)          # (n, E) or (n, T, E)
        w = torch.tensor(weights if weights is not None else [1.0] * len(images), device=features.device)
        w = (w / w.sum()).view(-1, *[1] * (features.ndim - 1))
        mean = (w * features).sum(0, keepdim=True)
        if loaded.adapter.unconditional_reference == "black":
            black = normalise_reference(torch.zeros_like(pixels[:1], dtype=torch.uint8))
            zero = image_features(loaded.image_encoder, black, kind)
        elif kind == "image_embeds":
            zero = torch.zeros_like(mean)
        else:
            zero = image_features(loaded.image_encoder, torch.zeros_like(pixels[:1]), kind)
        return loaded.adapter(mean), loaded.adapter(zero)


# -- the module -------------------------------------------------------------------------------------

def _loaded(model, models):
    from diffstudio.ipadapter_loading import LoadedIPAdapter

    if isinstance(model, LoadedIPAdapter):
        reason = model.adapter.mismatch(models.denoiser)
        if reason:
            raise IPAdapterMismatchError(f"the IP-Adapter {model.source} does not fit this model's denoiser: "
                                         f"{reason}")
        return model
    if model is not None:
        return models.add_ip_adapter(model)
    if len(models.ip_adapters) != 1:
        raise InvalidInputError(f"this model has {len(models.ip_adapters)} IP-Adapters added: add one with "
                                "models.add_ip_adapter(path, image_encoder=...) or name it with ImagePrompt(model=...)")
    return next(iter(models.ip_adapters.values()))


@dataclass
class _Active:
    adapter: Any
    positive: torch.Tensor  # (1, N, D) tokens of the reference
    negative: torch.Tensor  # (1, N, D) tokens of the zero image
    scales: list[float]  # per layer of the hook (cross-attention layer, FLUX double block)
    sigma_hi: float
    sigma_lo: float


def layer_scales(prompt: ImagePrompt, names: list[str]) -> list[float]:
    """The prompt's scale on each layer of the hook (named as ``adapter.layer_names`` names them), 0 outside its
    blocks."""
    from diffstudio.models.ipadapter import in_blocks, style_blocks

    blocks = prompt.blocks if prompt.blocks is not None else style_blocks(names) if prompt.style_only else None
    if prompt.blocks is None and prompt.style_only and not blocks:
        raise InvalidInputError(f"style_only (InstantStyle) picks a UNet's up-block attention; this model's layers "
                                f"are {', '.join(names[:2])} ...: name them with ImagePrompt(blocks=...)")
    if blocks is None:
        return [float(prompt.scale)] * len(names)
    scales = [float(prompt.scale) if in_blocks(name, blocks) else 0.0 for name in names]
    if not any(in_blocks(name, blocks) for name in names):
        raise InvalidInputError(f"the ImagePrompt blocks {list(blocks)} name none of this model's IP-Adapter "
                                f"layers (e.g. {', '.join(names[:3])} ...)")
    return scales


class ImagePrompts:
    """The denoiser module of a run's image prompts; several prompts each add their own image attention."""

    order = NETWORK + 5

    def __init__(self, prompts: list[ImagePrompt]):
        self.prompts = list(prompts)
        self.sources: dict[int, str] = {}  # prompt index -> the adapter file it used (filled by wrap)

    def recipe(self) -> dict:
        entries = []
        for i, prompt in enumerate(self.prompts):
            entry = prompt.describe()
            if "model" not in entry and i in self.sources:
                entry["model"] = self.sources[i].split("/")[-1]
            entries.append(entry)
        return {"ip_adapter": entries}

    def wrap(self, denoiser, gen: Generation):
        active = []
        for i, prompt in enumerate(self.prompts):
            if prompt.scale == 0:
                continue
            loaded = _loaded(prompt.model, gen.models)
            self.sources[i] = loaded.source
            scales = layer_scales(prompt, loaded.adapter.layer_names(gen.models.denoiser))
            positive, negative = reference_tokens(loaded, prompt.images, prompt.weights)
            active.append(_Active(loaded.adapter, positive, negative, scales, gen.sigma_at(prompt.start),
                                  gen.sigma_at(prompt.end)))
        if not active:
            return denoiser
        mark_negative_rows(gen)
        return ImagePromptDenoiser(denoiser, active)


class ImagePromptDenoiser(Wrapper):
    """``D(x, sigma, **cond)`` whose network call receives the active prompts' image attention as ``ip``."""

    def __init__(self, inner, active: list[_Active]):
        super().__init__(inner)
        self.active = active

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        negative = cond.get(NEGATIVE_ROWS)
        live = [a for a in self.active if is_active(sigma, (a.sigma_hi, a.sigma_lo))]
        if not live:
            return self.inner(x, sigma, **cond)
        if negative is None:
            negative = torch.zeros(x.shape[0], dtype=torch.bool)
        layers = None
        for a in live:
            rows = negative.to(a.positive.device).view(-1, 1, 1)
            tokens = torch.where(rows, a.negative, a.positive)                 # (B, N, D)
            entries = a.adapter.layer_inputs(tokens, a.scales)
            layers = entries if layers is None else [mine + theirs for mine, theirs in zip(layers, entries)]
        return self.inner(x, sigma, ip=layers, **cond)
