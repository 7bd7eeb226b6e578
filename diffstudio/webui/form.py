"""The Image tab's values -> the ``/v1/generate`` request body the HTTP API takes (docs/server.md).

The UI builds exactly the JSON a client would send and queues it through the API's own checks
(``diffstudio.server.v1.queue_generation``), so a recipe made in the UI and the same recipe sent to the API
give the same job. Zeros stand for "the model's default" (size, steps, CFG), as the UI's labels say.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

from PIL import Image

from diffstudio.control.names import ANNOTATORS

MODES = ("txt2img", "img2img", "inpaint")
PREPROCESSORS = ("none", *ANNOTATORS)


@dataclass
class RegionRow:
    """One region of the painter: its prompt, weight and painted mask (white = the region)."""

    prompt: str
    weight: float = 1.0
    mask: Image.Image | None = None
    negative_prompt: str | None = None
    feather: float = 0.0


@dataclass
class ControlRow:
    """One ControlNet unit as the UI holds it."""

    model: str
    image: Image.Image
    preprocess: str = "none"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = "balanced"
    mode: str = ""  # union ControlNets: what the control image is (canny, depth ...); "" for single-task ones


@dataclass
class ImagePromptRow:
    """The IP-Adapter panel: the adapter (a catalog name), its reference images, scale and active span."""

    name: str
    images: list[Image.Image] = field(default_factory=list)
    scale: float = 0.7
    start: float = 0.0
    end: float = 1.0


@dataclass
class ImageForm:
    """Everything the Image tab sends; defaults are the UI's initial values."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    sampler: str = ""  # "" = the model's
    scheduler: str = ""
    steps: int = 0  # 0 = the model's
    cfg_scale: float = 0.0
    width: int = 0
    height: int = 0
    seed: int = 0
    batch_size: int = 1
    batches: int = 1
    mode: str = "txt2img"
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.75
    regions: list[RegionRow] = field(default_factory=list)
    region_mode: str = "latent"
    global_weight: float | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    controlnets: list[ControlRow] = field(default_factory=list)
    ip_adapter: ImagePromptRow | None = None
    preview_every: int = 0  # a preview of the image every that many steps (0 = none)


class FormError(ValueError):
    """A value the form cannot turn into a request (shown to the user as is)."""


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _default(value, zero=0):
    return None if value in (None, zero) else value


def to_payload(form: ImageForm) -> dict:
    """The ``/v1/generate`` JSON body for ``form``."""
    if form.mode not in MODES:
        raise FormError(f"unknown mode {form.mode!r}; one of {', '.join(MODES)}")
    payload: dict = {
        "prompt": form.prompt, "negative_prompt": form.negative_prompt, "model": form.model or None,
        "width": _default(int(form.width)), "height": _default(int(form.height)),
        "steps": _default(int(form.steps)), "cfg_scale": _default(float(form.cfg_scale), 0.0),
        "seed": int(form.seed), "sampler": form.sampler or None, "scheduler": form.scheduler or None,
        "batch_size": int(form.batch_size), "batches": int(form.batches), "preview_every": int(form.preview_every),
    }
    if form.mode != "txt2img":
        if form.init_image is None:
            raise FormError(f"{form.mode} needs an image: upload one in the img2img editor (or send one from the "
                            "gallery)")
        payload["init_image"] = b64_png(form.init_image)
        payload["strength"] = float(form.strength)
        if form.mode == "inpaint":
            if form.mask is None:
                raise FormError("inpainting needs a mask: paint the area to repaint with the brush")
            payload["mask"] = b64_png(form.mask)
    regions = [r for r in form.regions if r.prompt.strip()]
    if regions:
        payload["regions"] = [_region(r) for r in regions]
        payload["region_mode"] = form.region_mode
        if form.global_weight is not None:
            payload["global_weight"] = float(form.global_weight)
    payload["loras"] = [{"name": name, "strength": float(strength)} for name, strength in form.loras if name]
    payload["controlnets"] = [_control(c) for c in form.controlnets if c.model]
    if form.ip_adapter is not None and form.ip_adapter.name:
        payload["ip_adapter"] = _image_prompt(form.ip_adapter)
    return payload


def _region(row: RegionRow) -> dict:
    item: dict = {"prompt": row.prompt, "weight": float(row.weight)}
    if row.mask is not None:
        item["mask"] = b64_png(row.mask)
    if row.negative_prompt:
        item["negative_prompt"] = row.negative_prompt
    if row.feather:
        item["feather"] = float(row.feather)
    return item


def _control(row: ControlRow) -> dict:
    if row.image is None:
        raise FormError(f"the ControlNet unit {row.model!r} has no control image: upload one")
    if row.preprocess not in PREPROCESSORS:
        raise FormError(f"unknown preprocessor {row.preprocess!r}; one of {', '.join(PREPROCESSORS)}")
    return {"model": row.model, "image": b64_png(row.image), "scale": float(row.scale), "start": float(row.start),
            "end": float(row.end), "preprocess": None if row.preprocess == "none" else row.preprocess,
            "control_mode": row.control_mode, "mode": row.mode.strip() or None}


def _image_prompt(row: ImagePromptRow) -> dict:
    if not row.images:
        raise FormError(f"the IP-Adapter {row.name!r} needs reference images: upload one or more")
    return {"name": row.name, "images": [b64_png(image) for image in row.images], "scale": float(row.scale),
            "start": float(row.start), "end": float(row.end)}


def queue_form(state, form: ImageForm):
    """Queue ``form`` as the API would its JSON body; returns the Job (errors are the API's named ones)."""
    from diffstudio.server.v1 import GenerateRequest, queue_generation

    return queue_generation(GenerateRequest(**to_payload(form)), state)
