"""Denoiser modules: the one way a feature joins a generation.

A module is an object with ``order`` and ``wrap(denoiser, gen) -> denoiser`` (and, optionally,
``recipe() -> dict`` for what the PNG recipe records). The pipeline sorts the run's modules by
``order`` and wraps the network's denoiser with each in turn, so each feature is written once for
every family and composes with the others:

==============  =======  ==========================================================================
stage           order    what a wrapper at that stage sees
==============  =======  ==========================================================================
``NETWORK``     0-49     ``D(x, sigma, **cond)``: one network call with its conditioning (cond and
                         uncond rows stacked). ControlNet residuals, IP-Adapter tokens and temporal
                         blocks enter here, through keyword arguments the network reads.
``GUIDANCE``    50       turns ``D(x, sigma, **cond)`` into ``D(x, sigma)``: CFG, or region prompts.
``LATENT``      60-99    ``D(x, sigma)`` on the whole latent batch: context windows over frames.
``OUTPUT``      100+     ``D(x, sigma)`` whose x0 is final: the inpainting blend, in-loop smoothing.
==============  =======  ==========================================================================

A wrapper is itself a denoiser: it keeps the wrapped one's ``kind`` and forwards unknown attributes
(``Wrapper`` does both), so samplers see no difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffstudio.pipeline.guidance import CFGDenoiser, LatentBlendDenoiser

NETWORK, GUIDANCE, LATENT, OUTPUT = 0, 50, 60, 100
NEGATIVE_ROWS = "negative_rows"  # a (B,) bool cond entry, True on the unconditional rows (mark_negative_rows)


@dataclass
class Generation:
    """What one run's modules may read: the resolved request, the models, the prompts as encoded, the
    sampling schedule and, for img2img/inpainting, the known latent and the masks."""

    models: Any
    request: Any  # pipeline.request.Request, resolved
    denoiser: Any  # the network's denoiser (prediction + network call), before any module
    sigmas: torch.Tensor
    cond: dict
    uncond: dict
    encode: Callable[[list[str], list[str]], tuple[dict, dict]]  # (prompts, negatives) -> (cond, uncond)
    prompts: list[str]  # the texts encoded (prompt <lora:...> tags taken out)
    negatives: list[str]
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent
    known: torch.Tensor | None = None  # the init image's latent (B, C, h, w)
    pixels: torch.Tensor | None = None  # the init image (B, 3, H, W) in [-1, 1]
    pixel_mask: torch.Tensor | None = None  # (1, 1, H, W), 1 = repaint
    latent_mask: torch.Tensor | None = None  # (B, 1, h, w)
    start: Any = None  # the start-latent strategy (start.py)
    modules: list = field(default_factory=list)  # the run's denoiser modules, in order
    guided: Any = None  # the denoiser the sampler calls: ``denoiser`` wrapped by ``modules``

    @property
    def family(self):
        return self.models.family

    def sigma_at(self, fraction: float) -> float:
        """The schedule's sigma a fraction of the way through its steps (0 = the first step, 1 = the end), linear
        between step boundaries: where modules with a start/end (ControlNet units, image prompts) switch."""
        steps = len(self.sigmas) - 1
        i = min(int(fraction * steps), steps - 1)
        w = fraction * steps - i
        return float(self.sigmas[i] * (1 - w) + self.sigmas[i + 1] * w)


def mark_negative_rows(gen: Generation) -> None:
    """Network-stage modules that treat the unconditional rows differently (ControlNet's "control" mode, image
    prompts' zero image) find them by this entry: CFG and regions stack cond and uncond dicts row by row, so the
    flags travel with their rows. A module reads it with ``cond.get`` and the network call drops it."""
    n = len(gen.prompts)
    gen.cond = {**gen.cond, NEGATIVE_ROWS: torch.zeros(n, dtype=torch.bool)}
    gen.uncond = {**gen.uncond, NEGATIVE_ROWS: torch.ones(n, dtype=torch.bool)}


def is_active(sigma, window: tuple[float, float]) -> bool:
    """Whether a call at ``sigma`` (a number or the (B,) sigmas of one call) lies in ``window`` = (sigma at start,
    sigma at end) of a module with a start/end (``Generation.sigma_at``)."""
    level = float(torch.as_tensor(sigma).reshape(-1)[0])
    return window[1] - 1e-6 <= level <= window[0] + 1e-6


class DenoiserModule(Protocol):
    order: int

    def wrap(self, denoiser, gen: Generation): ...


class Wrapper:
    """Base of denoiser wrappers: the wrapped denoiser's ``kind``; other attributes forwarded to it."""

    def __init__(self, inner):
        self.inner = inner
        self.kind = inner.kind

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


class ClassifierFreeGuidance:
    """CFG (Ho & Salimans 2022) with the run's prompts and ``cfg_scale``."""

    order = GUIDANCE

    def wrap(self, denoiser, gen: Generation):
        return CFGDenoiser(denoiser, gen.cond, gen.uncond, gen.request.cfg_scale)


class RegionPrompts:
    """A prompt per area (pipeline/regions.py, docs/regions.md): replaces plain CFG."""

    order = GUIDANCE

    def __init__(self, regions, mode: str = "latent"):
        self.regions, self.mode = regions, mode

    def wrap(self, denoiser, gen: Generation):
        from diffstudio.pipeline.regions import region_denoiser

        return region_denoiser(denoiser, self.regions, self.mode, gen)

    def recipe(self) -> dict:
        from diffstudio.pipeline.regions import region_recipe

        return region_recipe(self.regions, self.mode)


class InpaintBlend:
    """Inpainting with an ordinary checkpoint: x0 outside the mask is the init image's latent."""

    order = OUTPUT

    def wrap(self, denoiser, gen: Generation):
        return LatentBlendDenoiser(denoiser, gen.known, gen.latent_mask)


def compose(denoiser, modules, gen: Generation):
    """Wrap ``denoiser`` with ``modules`` in ``order`` (stable for equal orders). Exactly one module at the
    guidance stage turns the conditioned denoiser into an unconditioned one."""
    ordered = sorted(modules, key=lambda m: m.order)
    guidance = [m for m in ordered if m.order == GUIDANCE]
    if len(guidance) != 1:
        names = ", ".join(type(m).__name__ for m in guidance) or "none"
        raise ValueError(f"a run needs exactly one guidance module (CFG or regions), got: {names}")
    for module in ordered:
        denoiser = module.wrap(denoiser, gen)
    return denoiser
