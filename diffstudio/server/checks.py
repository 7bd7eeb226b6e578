"""Checks both APIs run before a job is queued, so a bad request is refused at once (4xx) instead of
failing in the queue: sampler and schedule names, sizes and counts against the server's limits, and the
``<lora:name>`` tags of the prompts (each must name a LoRA of the server's catalog: a tag never reaches a
file outside the models folder).

What only the loaded model can tell (a size its family cannot take, a clip skip deeper than its encoder)
is checked by ``Request.resolve`` in the job; the A1111 routes wait for it and answer 422 the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffstudio.errors import InvalidInputError
from diffstudio.io.recipe import SCHEDULER_FROM_DISPLAY, sampler_display_name, split_sampler
from diffstudio.server.catalog import Catalog
from diffstudio.server.payloads import check_pixels


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's settings)."""

    max_pixels: int = 2048 * 2048  # width x height of an output or input image
    max_images: int = 16  # images in one request (batch_size x batches)
    max_steps: int = 150


def sampler_and_scheduler(sampler: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """Our names from ours or A1111's (``"Euler a"``, ``"DPM++ 2M Karras"``, ``"Karras"``); None = the model's
    default. A sampler name with a folded schedule ("... Karras") gives the schedule unless one is given."""
    from diffstudio.sampling import SAMPLERS, SCHEDULERS

    ours, folded = (None, None)
    if sampler:
        ours, folded = (sampler, None) if sampler in SAMPLERS else split_sampler(sampler)
        if ours not in SAMPLERS:
            names = ", ".join(f"{sampler_display_name(s)!r}" for s in SAMPLERS)
            raise InvalidInputError(f"unknown sampler {sampler!r}; this server has: {names} (or our names: "
                                    f"{', '.join(SAMPLERS)})")
    schedule = None
    if scheduler:
        schedule = scheduler if scheduler in SCHEDULERS else SCHEDULER_FROM_DISPLAY.get(
            scheduler, scheduler.lower().replace(" ", "_"))
        if schedule == "automatic":
            schedule = None
        elif schedule not in SCHEDULERS:
            raise InvalidInputError(f"unknown scheduler {scheduler!r}; choose one of: automatic (the model's), "
                                    f"{', '.join(SCHEDULERS)}")
    return ours, schedule or folded


def check_counts(limits: Limits, width: int | None, height: int | None, steps: int | None, batch_size: int,
                 batches: int) -> None:
    if width is not None and height is not None:
        check_pixels(width, height, limits.max_pixels, "the output size")
    for name, value in (("width", width), ("height", height), ("steps", steps)):
        if value is not None and value < 1:
            raise InvalidInputError(f"{name} must be a positive whole number, got {value}")
    if steps is not None and steps > limits.max_steps:
        raise InvalidInputError(f"steps {steps} is more than this server's limit of {limits.max_steps}")
    if batch_size < 1 or batches < 1:
        raise InvalidInputError(f"batch_size and the batch count must be at least 1, got {batch_size} and {batches}")
    if batch_size * batches > limits.max_images:
        raise InvalidInputError(f"{batch_size * batches} images in one request; this server makes at most "
                                f"{limits.max_images} per request (send several requests)")


def check_lora_tags(catalog: Catalog, *prompts: str) -> None:
    """Every ``<lora:name:w>`` tag must resolve, in the catalog's LoRA folders, to one of its LoRAs."""
    from diffstudio.conditioning.lora_tags import requested_loras, resolve_lora, split_lora_tags

    _, tags = split_lora_tags([p for p in prompts if p])
    for name, _, _ in requested_loras(tags):
        catalog.check_lora_path(name, resolve_lora(name, catalog.lora_dirs))
