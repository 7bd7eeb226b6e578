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

from diffstudio.control.names import ANNOTATORS
from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import NEGATIVE_ROWS, NETWORK, Generation, Wrapper, is_active, mark_negative_rows

CONTROL_MODES = ("balanced", "prompt", "control")
SOFT_DECAY = 0.825  # A1111's "My prompt is more important" per-layer weight base
# ControlNetUnit.preprocess names (annotators); the learned ones read their weights from $DIFFSTUDIO_ANNOTATORS
PREPROCESSORS = ANNOTATORS  # the learned and controlnet-aux ones read weight files
FRAMES = "frames"  # video runs: the frame indices of the rows' video window (video/animatediff.py)


@dataclass
class ControlNetUnit:
    """One ControlNet with its control image.

    model: a loaded ControlNet (``models.add_controlnet(path)``) or a path to one.
    image: the control image (path, PIL or array), resized and centre-cropped to the output size; or a finished
        hint tensor (1, C, H, W), e.g. ``annotators.inpaint(image, mask)`` for the inpainting ControlNet; in a
        video run, a list of them (one per frame, read when a window needs them).
    preprocess: an annotator run on ``image`` first (``"canny"``, ``"lineart"``, ``"softedge"``, ``"tile"``,
        ``"blur"``; the learned ``"hed"``, ``"lineart_realistic"``, ``"lineart_coarse"``, whose weight files are
        read from the folder in ``DIFFSTUDIO_ANNOTATORS``; ``"depth"``, ``"openpose"``, ``"normal"``, ``"mlsd"``,
        ``"pidinet"`` through controlnet-aux from that folder; or any callable image -> image; None = use as is).
    start / end: the fraction of the steps during which the unit acts (0 = first step, 1 = last).
    mode: what the control image is, for ControlNets that take modes (union ControlNets: the SDXL ControlNet-Union's
        ``"canny"``, ``"depth"``, ``"openpose"`` ..., FLUX union's ``"canny"``, ``"depth"`` ...; or an index). A
        ControlNet-Union also takes a list of modes with a list of images, one per mode, fused in one call.
    """

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None
    control_mode: str = "balanced"
    mode: int | str | list | tuple | None = None

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InvalidInputError(f"a ControlNet unit needs 0 <= start <= end <= 1, got {self.start}..{self.end}")
        if self.control_mode not in CONTROL_MODES:
            raise InvalidInputError(f"unknown control_mode {self.control_mode!r}; use one of "
                                    f"{', '.join(CONTROL_MODES)}")
        if self.several_modes and (not isinstance(self.image, (list, tuple)) or len(self.image) != len(self.mode)):
            raise InvalidInputError(f"a ControlNet unit with {len(self.mode)} modes takes a list of as many control "
                                    "images, one per mode")

    @property
    def several_modes(self) -> bool:
        """Several control images fused in one call of a union ControlNet (``mode`` a list, ``image`` one per mode)."""
        return isinstance(self.mode, (list, tuple))

    def describe(self) -> dict:
        name = self.model if isinstance(self.model, str) else getattr(self.model, "source", type(self.model).__name__)
        out = {"model": str(name).split("/")[-1], "scale": self.scale, "start": self.start, "end": self.end}
        if self.preprocess:
            out["preprocess"] = preprocess_name(self.preprocess)
        if self.control_mode != "balanced":
            out["control_mode"] = self.control_mode
        if self.mode is not None:
            out["mode"] = list(self.mode) if self.several_modes else self.mode
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
    preprocessors = {name: getattr(annotators, name) for name in PREPROCESSORS}
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
            in_latent = getattr(model, "hint_space", "pixels") == "latent"
            check_mode(model, unit)
            if unit.several_modes:  # a union ControlNet's images, one per mode, fused in one call
                hint = [control_image(i, unit.preprocess, r.width, r.height).to(gen.models.device, gen.models.dtype)
                        for i in unit.image]
            elif isinstance(unit.image, (list, tuple)):
                if in_latent:
                    raise InvalidInputError("a ControlNet that reads its control image as a latent takes one "
                                            "image per run, not one per frame")
                hint = FrameHints(unit.image, unit.preprocess, r.width, r.height)
            else:
                hint = control_image(unit.image, unit.preprocess, r.width, r.height)
                if in_latent:  # DiT ControlNets (SD3, FLUX, Hunyuan-DiT) read the VAE's latent of the control image
                    hint = latent_hint(model, hint, gen.models, r.tiled_vae)
                hint = hint.to(gen.models.device, gen.models.dtype)
            hi, lo = gen.sigma_at(unit.start), gen.sigma_at(unit.end)
            loaded.append(Active(unit, model, hint, hi, lo, 1 if in_latent else gen.family.latent.downscale))
        if not loaded:
            return denoiser
        mark_negative_rows(gen)
        return ControlledDenoiser(denoiser, loaded, gen.models)


def latent_hint(model, pixels: torch.Tensor, models, tiled_vae) -> torch.Tensor:
    """The latent a ``hint_space = "latent"`` ControlNet reads for the control image ``pixels`` (1, 3, H, W) in [0, 1]:
    the VAE's latent, or what the ControlNet's ``latent_hint(pixels, encode)`` builds with the VAE (FLUX inpainting
    ControlNets: the masked image's latent and the mask)."""
    from diffstudio.pipeline.generate import encode_to_latent

    def encode(image):  # (B, 3, H, W) in [-1, 1] -> the model's latent
        return encode_to_latent(models, image, tiled_vae)

    if hasattr(model, "latent_hint"):
        return model.latent_hint(pixels, encode)
    return encode(pixels * 2 - 1)


def check_mode(model, unit: ControlNetUnit) -> None:
    """Refuse a unit whose mode its ControlNet cannot take, or a union ControlNet's unit without a mode, now (not at
    the first step). ControlNets with modes have ``mode_index`` (None without a mode, an error where one is needed)."""
    if not hasattr(model, "mode_index"):
        if unit.mode is not None:
            raise InvalidInputError(f"this ControlNet ({type(model).__name__}) has no modes (got mode={unit.mode!r}); "
                                    "only union ControlNets take one")
        return
    if unit.several_modes and not getattr(model, "fuses_modes", False):
        raise InvalidInputError("only a ControlNet-Union (SDXL) fuses several control images in one unit; give "
                                "this ControlNet one unit per image")
    model.mode_index(getattr(model, "mode", None) if unit.mode is None else unit.mode)


@dataclass
class Active:
    """A unit as a run holds it: its loaded model, its hint (pixels, or the VAE latent for ``hint_space =
    "latent"`` models), the sigmas it acts between and the hint's pixels per latent pixel (for tiles)."""

    unit: ControlNetUnit
    model: Any
    hint: Any
    sigma_hi: float
    sigma_lo: float
    per_latent: int


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
    Under tiled diffusion (``tile=(top, left, h, w)`` in latent pixels) each hint is cropped to the tile.

    A UNet ControlNet is called ``model(x, hint, t, context, y)`` and returns one residual per encoder skip
    plus the middle's (a list). A DiT ControlNet (``hint_space = "latent"``) is called ``model(x, hint_latent,
    t, context, y, **network_kwargs)`` (the rest of what the denoiser network receives, e.g. FLUX's guidance)
    and returns a list, or a dict of lists (FLUX: double and single blocks); the network takes the same
    structure as ``control=``. A DiT ControlNet that reads the control image in pixels (XLabs' FLUX ones) says
    ``takes_network_kwargs = True`` to be called so with the pixel hint.

    A unit's ``mode`` goes to the call as ``mode=`` (union ControlNets; it wins over a ``with_mode`` handle's). A
    ControlNet-Union unit with several modes is called with the list of its hints and ``scales`` (its scale, which
    then weighs each hint inside the union's fusion instead of the residuals: diffusers' rule)."""

    takes_frames = True  # reads the ``frames`` entry of a video run (per-frame control images)

    def __init__(self, inner, units: list[Active], models):
        super().__init__(inner)
        self.units, self.models = units, models

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        negative = cond.get(NEGATIVE_ROWS)
        frames = cond.get(FRAMES)
        active = [u for u in self.units if is_active(sigma, (u.sigma_hi, u.sigma_lo))]
        if not active:
            return self.inner(x, sigma, **cond)
        sigma_rows = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        x_in, t = self.inner.prediction.network_input(x, sigma_rows)
        dtype, device = self.models.dtype, self.models.device
        tile = cond.get("tile")
        context, y = cond.get("context"), cond.get("y")
        total = None
        for a in active:
            hints = a.hint if isinstance(a.hint, list) else [a.hint]
            rows = [h.rows(frames, x.shape[0]) if isinstance(h, FrameHints) else h.expand(x.shape[0], -1, -1, -1)
                    for h in hints]
            if tile is not None:
                top, left, th, tw = (v * a.per_latent for v in tile)
                rows = [r[..., top:top + th, left:left + tw] for r in rows]
            rows = [r.to(device, dtype) for r in rows]
            dit = getattr(a.model, "takes_network_kwargs", a.per_latent == 1)  # DiT ControlNets only
            extra = _network_kwargs(cond, device, dtype) if dit else {}
            if a.unit.mode is not None:
                extra["mode"] = list(a.unit.mode) if a.unit.several_modes else a.unit.mode
            scale = a.unit.scale
            if len(rows) > 1:  # the scale weighs each image inside the union's fusion, not the residuals
                extra["scales"], scale = [a.unit.scale] * len(rows), 1.0
            with torch.inference_mode():
                res = a.model(x_in.to(device, dtype), rows if a.unit.several_modes else rows[0], t.to(device),
                              None if context is None else context.to(device, dtype),
                              None if y is None else y.to(device, dtype), **extra)
            res = _weighted(res, a.unit, negative, x.shape[0], device, dtype, scale)
            total = res if total is None else _summed(total, res)
        return self.inner(x, sigma, control=total, **cond)


def _network_kwargs(cond: dict, device, dtype) -> dict:
    """What the denoiser network receives besides x, t, context and y, for DiT ControlNets (e.g. guidance)."""
    from diffstudio.pipeline.denoiser import LOCATION_KEYS

    skip = {"context", "y", "control", *LOCATION_KEYS}
    return {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in cond.items() if k not in skip}


def _weighted(res, unit: ControlNetUnit, negative, rows: int, device, dtype, scale: float | None = None):
    """A unit's residuals times its scale; A1111's soft weights in "prompt" mode (over a UNet's list of layers),
    zero on unconditional rows in "control" mode. Lists and dicts of lists keep their structure; a tensor that
    fills several places of a list (a FLUX ControlNet's residual serves several blocks) is scaled once."""
    if isinstance(res, dict):
        return {k: _weighted(v, unit, negative, rows, device, dtype, scale) for k, v in res.items()}
    scale = torch.full((rows,), float(unit.scale if scale is None else scale), device=device, dtype=dtype)
    if unit.control_mode == "control" and negative is not None:
        scale = scale * (~negative.to(device)).to(dtype)
    layers = len(res)
    out, done = [], {}
    for i, r in enumerate(res):
        factor = SOFT_DECAY ** float(layers - 1 - i) if unit.control_mode == "prompt" else None
        key = (id(r), factor)  # the residuals stay alive in res, so their ids are theirs
        if key not in done:
            w = scale if factor is None else scale * factor
            done[key] = r * w.view(rows, *([1] * (r.ndim - 1)))
        out.append(done[key])
    return out


def _summed(a, b):
    """Two units' residuals added place by place (a repeated pair of tensors once). Both must have the same
    structure: FLUX ControlNets with different block counts give one residual per block of the transformer (an
    empty list, a ControlNet without blocks of that kind, adds nothing)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise InvalidInputError(f"these ControlNets give residuals for different layers ({sorted(a)} and "
                                    f"{sorted(b)}): they cannot be combined in one run")
        return {k: _summed(a[k], b[k]) for k in a}
    if not a or not b:
        return a or b
    if len(a) != len(b):
        raise InvalidInputError(f"these ControlNets give {len(a)} and {len(b)} residuals for the same layers: they "
                                "were made for different base models and cannot be combined in one run")
    done = {}
    for x, y in zip(a, b):
        if (id(x), id(y)) not in done:
            done[id(x), id(y)] = x + y
    return [done[id(x), id(y)] for x, y in zip(a, b)]
