"""ControlNet units as a denoiser module (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models").

Each unit is a ControlNet, a control image (the hint), a scale and the fraction of the steps it acts on.
At the network stage the module computes every active unit's residuals from the network's own input
(the scaled latent, the timestep, the text context and SDXL's vector y), sums them, and hands the sum
to the UNet as ``control=`` (one residual per encoder skip, then the middle: docs/controlnet.md).

``control_mode`` follows A1111: ``"balanced"`` adds the residuals to the conditional and the
unconditional rows alike; ``"prompt"`` ("my prompt is more important") scales the residual of layer i
of the 13 by 0.825^(12 - i), so the deep layers dominate; ``"control"`` ("ControlNet is more important")
adds them to the conditional rows only, so CFG amplifies the control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import NEGATIVE_ROWS, NETWORK, Generation, Wrapper, is_active, mark_negative_rows

CONTROL_MODES = ("balanced", "prompt", "control")
SOFT_DECAY = 0.825  # A1111's "My prompt is more important" per-layer weight base
FRAMES = "frames"  # video runs: the frame indices of the rows' video window (video/animatediff.py)


@dataclass
class ControlNetUnit:
    """One ControlNet with its control image.

    model: a loaded ControlNet (``models.add_controlnet(path)``) or a path to one.
    image: the control image (path, PIL or array), resized and centre-cropped to the output size; or a finished
        hint tensor (1, C, H, W), e.g. ``annotators.inpaint(image, mask)`` for the inpainting ControlNet; in a
        video run, a list of them (one per frame, read when a window needs them).
    preprocess: an annotator run on ``image`` first (``"canny"``, ``"lineart"``, ``"softedge"``, ``"tile"``,
        ``"blur"``, or any callable image -> image, e.g. a controlnet-aux detector; None = use as is).
    start / end: the fraction of the steps during which the unit acts (0 = first step, 1 = last).
    """

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None
    control_mode: str = "balanced"

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InvalidInputError(f"a ControlNet unit needs 0 <= start <= end <= 1, got {self.start}..{self.end}")
        if self.control_mode not in CONTROL_MODES:
            raise InvalidInputError(f"unknown control_mode {self.control_mode!r}; use one of "
                                    f"{', '.join(CONTROL_MODES)}")

    def describe(self) -> dict:
        name = self.model if isinstance(self.model, str) else getattr(self.model, "source", type(self.model).__name__)
        out = {"model": str(name).split("/")[-1], "scale": self.scale, "start": self.start, "end": self.end}
        if self.preprocess:
            out["preprocess"] = preprocess_name(self.preprocess)
        if self.control_mode != "balanced":
            out["control_mode"] = self.control_mode
        return out


def preprocess_name(preprocess) -> str:
    """An annotator's name for recipes: the string, or a callable's qualified name."""
    if isinstance(preprocess, str):
        return preprocess
    return getattr(preprocess, "__qualname__", None) or type(preprocess).__name__


def control_image(image, preprocess: str | None, width: int, height: int) -> torch.Tensor:
    """The hint (1, 3, height, width) in [0, 1]: annotated, then scaled to cover the size and centre-cropped."""
    from diffstudio.control import annotators
    from diffstudio.io.images import load_image

    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 4:
        # a finished hint, e.g. annotators.inpaint's (masked pixels at -1): scaled to cover and centre-cropped
        # as a tensor, so its values stay as they are
        scale = max(width / image.shape[-1], height / image.shape[-2])
        size = (max(height, round(image.shape[-2] * scale)), max(width, round(image.shape[-1] * scale)))
        hint = torch.nn.functional.interpolate(image.float(), size=size, mode="nearest-exact")
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        return hint[..., top:top + height, left:left + width]
    preprocessors = {"canny": annotators.canny, "lineart": annotators.lineart, "softedge": annotators.softedge,
                     "tile": annotators.tile, "blur": annotators.blur}
    picture = load_image(image)
    if callable(preprocess):
        picture = load_image(preprocess(picture))
    elif preprocess is not None:
        if preprocess not in preprocessors:
            raise InvalidInputError(f"unknown ControlNet preprocessor {preprocess!r}; use one of: "
                                    f"{', '.join(preprocessors)} (or None for an image already annotated)")
        picture = load_image(preprocessors[preprocess](picture))
    scale = max(width / picture.width, height / picture.height)
    size = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    picture = picture.resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    return annotators.hint_tensor(picture)


class ControlNets:
    """The denoiser module of a run's ControlNet units; several units sum their residuals."""

    order = NETWORK + 10

    def __init__(self, units: list[ControlNetUnit]):
        self.units = list(units)

    def recipe(self) -> dict:
        return {"controlnets": [u.describe() for u in self.units]}

    def wrap(self, denoiser, gen: Generation):
        r = gen.request
        loaded = []
        for unit in self.units:
            if unit.scale == 0:
                continue
            model = gen.models.add_controlnet(unit.model) if isinstance(unit.model, (str,)) or hasattr(
                unit.model, "__fspath__") else unit.model
            if isinstance(unit.image, (list, tuple)):
                hint = FrameHints(unit.image, unit.preprocess, r.width, r.height)
            else:
                hint = control_image(unit.image, unit.preprocess, r.width, r.height).to(gen.models.device,
                                                                                        gen.models.dtype)
            hi, lo = gen.sigma_at(unit.start), gen.sigma_at(unit.end)
            loaded.append((unit, model, hint, hi, lo))
        if not loaded:
            return denoiser
        mark_negative_rows(gen)
        return ControlledDenoiser(denoiser, loaded, gen.models, gen.family.latent.downscale)


class FrameHints:
    """A unit's control images, one per video frame: ``rows(frames, n)`` -> the hints of those frames for
    ``n`` rows (videos of ``len(frames)`` frames each, frame index fastest). Only the last window's hints
    are kept, so a long video's control frames are never all in memory."""

    def __init__(self, images, preprocess: str | None, width: int, height: int):
        self.images, self.preprocess, self.size = list(images), preprocess, (width, height)
        self._cache: dict[int, torch.Tensor] = {}

    def rows(self, frames, n: int) -> torch.Tensor:
        if frames is None:
            raise InvalidInputError("a ControlNet unit with one image per frame needs a video run "
                                    "(diffstudio.VideoPipeline); give an image run one control image")
        frames = [int(i) for i in frames]
        if max(frames) >= len(self.images):
            raise InvalidInputError(f"the ControlNet unit has {len(self.images)} control frames but the video "
                                    f"has frame {max(frames)}: give one control image per frame")
        kept = {}
        for i in frames:
            kept[i] = self._cache[i] if i in self._cache else control_image(self.images[i], self.preprocess,
                                                                            *self.size)
        self._cache = kept
        window = torch.cat([kept[i] for i in frames])
        return window.repeat(n // len(frames), 1, 1, 1)


class ControlledDenoiser(Wrapper):
    """``D(x, sigma, **cond)`` whose network call receives the active units' summed residuals as ``control``.
    Under tiled diffusion (``tile=(top, left, h, w)`` in latent pixels) each hint is cropped to the tile."""

    takes_frames = True  # reads the ``frames`` entry of a video run (per-frame control images)

    def __init__(self, inner, units, models, downscale: int):
        super().__init__(inner)
        self.units, self.models, self.downscale = units, models, downscale

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        negative = cond.get(NEGATIVE_ROWS)
        frames = cond.get(FRAMES)
        active = [u for u in self.units if is_active(sigma, u[3:5])]
        if not active:
            return self.inner(x, sigma, **cond)
        sigma_rows = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        x_in, t = self.inner.prediction.network_input(x, sigma_rows)
        dtype, device = self.models.dtype, self.models.device
        tile, d = cond.get("tile"), self.downscale
        context = cond.get("context")
        y = cond.get("y")
        total: list[torch.Tensor] | None = None
        for unit, model, hint, _, _ in active:
            rows = hint.rows(frames, x.shape[0]) if isinstance(hint, FrameHints) else \
                hint.expand(x.shape[0], -1, -1, -1)
            if tile is not None:
                top, left, th, tw = tile
                rows = rows[..., top * d:(top + th) * d, left * d:(left + tw) * d]
            with torch.inference_mode():
                res = model(x_in.to(device, dtype), rows.to(device, dtype),
                            t.to(device), None if context is None else context.to(device, dtype),
                            None if y is None else y.to(device, dtype))
            weights = _layer_weights(unit, len(res), negative, x.shape[0], device, dtype)
            res = [r * w for r, w in zip(res, weights)]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        return self.inner(x, sigma, control=total, **cond)


def _layer_weights(unit: ControlNetUnit, layers: int, negative, rows: int, device, dtype) -> list[torch.Tensor]:
    """Per residual: the unit's scale, A1111's soft weights in "prompt" mode, zero on unconditional rows in
    "control" mode. Each weight broadcasts over (rows, C, h, w)."""
    scale = torch.full((rows, 1, 1, 1), float(unit.scale), device=device, dtype=dtype)
    if unit.control_mode == "control" and negative is not None:
        scale = scale * (~negative.to(device)).to(dtype).view(rows, 1, 1, 1)
    if unit.control_mode == "prompt":
        return [scale * SOFT_DECAY ** float(layers - 1 - i) for i in range(layers)]
    return [scale] * layers
