"""The learned annotators the softedge and lineart ControlNets were trained with, from the weight files of
lllyasviel/Annotators: HED soft edges (``ControlNetHED.pth``) and informative-drawings line art
(``sk_model.pth``, "realistic"; ``sk_model2.pth``, "coarse"). Networks: `diffstudio.models.annotators`.

Each runs as controlnet-aux's detector does (its ``HEDdetector`` and ``LineartDetector``, the ControlNet 1.1
preprocessors): the RGB image is resized so its short side is ``detect_resolution`` and both sides are multiples
of 64 (OpenCV's Lanczos-4 when enlarging, its area resampling otherwise), run through the network, and the
result resized (bilinear) to the output size. HED upsamples its five side outputs to the detection size
(bilinear), averages them, applies the sigmoid and, with ``safe=True``, quantises to steps of 1/2 (``floor(3 e)
/ 2``); line art is inverted so lines are white on black. The resizes reproduce OpenCV's ``cv2.resize``
(half-pixel centres, replicated borders) with NumPy, so no OpenCV is needed.

The folder holding the files is ``weights_dir=`` (a file path is taken as the file itself), else the
environment variable ``DIFFSTUDIO_ANNOTATORS``. Files are read with ``torch.load(weights_only=True)`` (or as
safetensors); networks are kept loaded per file and device.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffstudio.control.names import ANNOTATORS_ENV
from diffstudio.errors import AnnotatorWeightsNotFoundError, InvalidInputError, UnknownModelError
from diffstudio.io.images import ImageLike, load_image

SOURCE_REPO = "lllyasviel/Annotators"
HED_FILE = "ControlNetHED.pth"
LINEART_FILES = {"realistic": "sk_model.pth", "coarse": "sk_model2.pth"}


# ---- OpenCV-equivalent resizing: one (dst, src) weight matrix per axis -------------------------------------

def _matrix(taps: np.ndarray, coefficients: np.ndarray, src: int, fixed_point: bool) -> np.ndarray:
    """(dst, src) weights from per-output taps (source indices, clamped to the image as OpenCV's replicated
    border) and their coefficients; ``fixed_point``: each coefficient in steps of 1/2048, as OpenCV's 8-bit path."""
    if fixed_point:
        coefficients = np.rint(coefficients * 2048) / 2048
    weights = np.zeros((taps.shape[0], src))
    rows = np.repeat(np.arange(taps.shape[0]), taps.shape[1])
    np.add.at(weights, (rows, np.clip(taps, 0, src - 1).ravel()), coefficients.ravel())
    return weights


def _source_position(dst: int, src: int) -> np.ndarray:
    """Output pixel centres in source pixels, in float32 as OpenCV computes them."""
    return ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32).astype(np.float64)


def _linear_weights(dst: int, src: int, fixed_point: bool) -> np.ndarray:
    """cv2 INTER_LINEAR: between the two source pixels around each output centre, clamped to the border."""
    pos = np.clip(_source_position(dst, src), 0, src - 1)
    left = np.floor(pos).astype(int)
    frac = pos - left
    return _matrix(np.stack([left, left + 1], 1), np.stack([1 - frac, frac], 1), src, fixed_point)


def _area_weights(dst: int, src: int, fixed_point: bool) -> np.ndarray:
    """cv2 INTER_AREA shrinking: each output pixel is the mean over its footprint [d, d + 1) * src / dst."""
    edges = np.arange(dst + 1) * (src / dst)
    pixels = np.arange(src)[None]
    overlap = np.clip(np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels), 0, None)
    return overlap / overlap.sum(1, keepdims=True)                # computed in floating point by OpenCV too


def _area_as_linear_weights(dst: int, src: int, fixed_point: bool) -> np.ndarray:
    """cv2 INTER_AREA when a side grows: bilinear between source pixels floor(d * src / dst) and the next, the
    weight of the next being how far output pixel d reaches past the first's edge (OpenCV's emulation)."""
    scale = src / dst
    left = np.floor(np.arange(dst) * scale).astype(int)
    frac = ((np.arange(dst) + 1) - (left + 1) / scale).astype(np.float32).astype(np.float64)
    frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    return _matrix(np.stack([left, left + 1], 1), np.stack([1 - frac, frac], 1), src, fixed_point)


def _lanczos4_weights(dst: int, src: int, fixed_point: bool) -> np.ndarray:
    """cv2 INTER_LANCZOS4: 8 taps of sinc(t) sinc(t / 4) around each output centre, normalised to sum 1 (in
    float32, summed in order, as OpenCV does: its 8-bit results are then reproduced exactly)."""
    pos = _source_position(dst, src)
    left = np.floor(pos).astype(int)
    frac = (pos - left).astype(np.float32).astype(np.float64)
    taps = left[:, None] + np.arange(-3, 5)[None]                                      # (dst, 8)
    # sin(pi t) sin(pi t / 4) / (pi t / 4)^2 at t = frac + 3 - i, with the sines of all taps from one angle
    # (they differ by multiples of pi / 4): OpenCV's formula, kept so its float32 rounding is reproduced
    angle = -(frac + 3) * np.pi / 4
    sin_cos = np.stack([np.sin(angle), np.cos(angle)], 1)                               # (dst, 2)
    phase = -np.arange(8) * (3 * np.pi / 4)
    rotate = np.stack([np.cos(phase), np.sin(phase)], 0)                                 # (2, 8)
    rotate[np.abs(rotate) < 1e-12] = 0.0
    t = -(frac[:, None] + 3 - np.arange(8)) * np.pi / 4
    with np.errstate(divide="ignore", invalid="ignore"):  # t = 0 where frac = 0: that row is set below
        kernel = ((sin_cos @ rotate) / (t * t)).astype(np.float32)
        kernel = kernel * (np.float32(1) / np.cumsum(kernel, axis=1, dtype=np.float32)[:, -1:])
    kernel[frac < np.finfo(np.float32).eps] = np.eye(8, dtype=np.float32)[3]
    return _matrix(taps, kernel.astype(np.float64), src, fixed_point)


def resize(pixels: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """``cv2.resize(pixels, size, interpolation=...)`` for ``method`` "linear", "area" or "lanczos4", on an
    (H, W) or (H, W, C) array; ``size`` is (width, height). uint8 in: uint8 out, as OpenCV's fixed-point
    arithmetic gives it (Lanczos-4 exactly; linear by up to one level, where OpenCV rounds between its passes);
    float in: float out."""
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels.copy()
    out_w, out_h = size
    if method == "area":
        shrinks = out_w <= width and out_h <= height
        make = _area_weights if shrinks else _area_as_linear_weights
    elif method == "linear":
        make = _linear_weights
    elif method == "lanczos4":
        make = _lanczos4_weights
    else:
        raise InvalidInputError(f"unknown resize method {method!r}")
    fixed_point = pixels.dtype == np.uint8
    weights_y, weights_x = make(out_h, height, fixed_point), make(out_w, width, fixed_point)
    values = np.einsum("yh,hw...,xw->yx...", weights_y, pixels.astype(np.float64), weights_x)
    if pixels.dtype == np.uint8:
        return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)
    return values.astype(pixels.dtype)


def detection_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``resolution``, both rounded to multiples of 64
    (controlnet-aux's ``resize_image``; half-way rounds to even), at least 64."""
    if resolution < 64:
        raise InvalidInputError(f"an annotator's resolution must be at least 64, got {resolution}")
    k = resolution / min(width, height)
    return (max(64, int(np.round(width * k / 64.0)) * 64), max(64, int(np.round(height * k / 64.0)) * 64))


def _to_detection(pixels: np.ndarray, resolution: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    k = resolution / min(width, height)
    return resize(pixels, detection_size(width, height, resolution), "lanczos4" if k > 1 else "area")


def _to_output(detected: np.ndarray, source_size: tuple[int, int], image_resolution: int | None) -> Image.Image:
    """The (H, W) uint8 map at the output size, as RGB: ``image_resolution`` as controlnet-aux sizes it (from
    the detection size, bilinear), or None: the input's size (bilinear when enlarging, area when shrinking)."""
    height, width = detected.shape
    if image_resolution is not None:
        detected = resize(detected, detection_size(width, height, image_resolution), "linear")
    else:
        grows = source_size[0] >= width and source_size[1] >= height
        detected = resize(detected, source_size, "linear" if grows else "area")
    return Image.fromarray(np.repeat(detected[..., None], 3, axis=-1))


# ---- weights ----------------------------------------------------------------------------------------------

def weights_file(filename: str, weights_dir: str | Path | None, what: str) -> Path:
    """The annotator file ``filename`` in ``weights_dir`` (or $DIFFSTUDIO_ANNOTATORS); a file path is the file."""
    fetch = (f"{what} needs {filename} from the Hugging Face repository {SOURCE_REPO} "
             f"(https://huggingface.co/{SOURCE_REPO}/blob/main/{filename})")
    folder = weights_dir if weights_dir is not None else os.environ.get(ANNOTATORS_ENV) or None
    if folder is None:
        raise AnnotatorWeightsNotFoundError(
            f"{fetch}; no annotator folder was given: put the file in a folder and pass it as weights_dir= "
            f"(diffstudio annotate --annotators DIR) or set {ANNOTATORS_ENV}=DIR")
    folder = Path(folder).expanduser()
    path = folder if folder.is_file() else folder / filename
    if not path.is_file():
        where = "does not exist" if not folder.exists() else f"has no {filename}"
        raise AnnotatorWeightsNotFoundError(f"{fetch}; the annotator folder {folder} {where}: download the file "
                                            "into it")
    return path


def _checked_state_dict(path: Path, network: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """The file's tensors, if they are exactly ``network``'s keys and shapes; else UnknownModelError."""
    from diffstudio.io.state_dict import read_state_dict

    state_dict = read_state_dict(path, dtype=torch.float32)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or extra or wrong:
        found = "; ".join(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                          for label, keys in (("missing", missing), ("unexpected", extra), ("other shape", wrong))
                          if keys)
        raise UnknownModelError(f"{path} is not the {what} network ({found}); use the file of that name from "
                                f"{SOURCE_REPO}")
    return state_dict


@lru_cache(maxsize=6)
def _load(kind: str, path: str, stamp: tuple[int, int], device: str) -> torch.nn.Module:
    """The network in ``path`` (kept per file, its size and modification time, and device)."""
    from diffstudio.models.annotators import HEDNetwork, LineartGenerator

    network = HEDNetwork() if kind == "hed" else LineartGenerator()
    network.load_state_dict(_checked_state_dict(Path(path), network, "HED" if kind == "hed" else "line-art"))
    return network.eval().requires_grad_(False).to(device)


def load_network(kind: str, filename: str, weights_dir, device, what: str) -> torch.nn.Module:
    path = weights_file(filename, weights_dir, what).resolve()
    stat = path.stat()
    return _load(kind, str(path), (stat.st_size, stat.st_mtime_ns), str(torch.device(device)))


# ---- the annotators ---------------------------------------------------------------------------------------

def _rgb(image: ImageLike) -> np.ndarray:
    return np.asarray(load_image(image), dtype=np.uint8)


def hed(image: ImageLike, weights_dir: str | Path | None = None, *, detect_resolution: int = 512,
        image_resolution: int | None = None, safe: bool = False, device: str | torch.device = "cpu") -> Image.Image:
    """HED soft edges, white on black, RGB (the softedge ControlNets' ``softedge_hed`` / ``softedge_hedsafe``
    with ``safe=True``). Needs ``ControlNetHED.pth``. The output has the input's size, or with
    ``image_resolution`` controlnet-aux's size for it (short side, multiples of 64)."""
    network = load_network("hed", HED_FILE, weights_dir, device, "the HED annotator")
    source = _rgb(image)
    pixels = _to_detection(source, detect_resolution)
    height, width = pixels.shape[:2]
    with torch.inference_mode():
        sides = network(torch.from_numpy(pixels).to(device, torch.float32).permute(2, 0, 1)[None])
    sides = [resize(side[0, 0].float().cpu().numpy(), (width, height), "linear") for side in sides]
    edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(sides, -1), -1).astype(np.float64)))
    if safe:
        edge = np.floor(edge.astype(np.float32) * 3.0) / 2.0
    detected = np.clip(edge * 255.0, 0, 255).astype(np.uint8)                     # truncated, as controlnet-aux
    return _to_output(detected, (source.shape[1], source.shape[0]), image_resolution)


def _lineart(image: ImageLike, style: str, weights_dir, detect_resolution: int, image_resolution: int | None,
             device) -> Image.Image:
    network = load_network(f"lineart_{style}", LINEART_FILES[style], weights_dir, device,
                           f"the {style} line-art annotator")
    source = _rgb(image)
    pixels = _to_detection(source, detect_resolution)
    with torch.inference_mode():
        x = torch.from_numpy(pixels).to(device, torch.float32).permute(2, 0, 1)[None] / 255.0
        line = network(x)[0, 0].float().cpu().numpy()
    detected = np.clip(line * 255.0, 0, 255).astype(np.uint8)                     # truncated, as controlnet-aux
    out = _to_output(detected, (source.shape[1], source.shape[0]), image_resolution)
    return Image.fromarray(255 - np.asarray(out))


def lineart_realistic(image: ImageLike, weights_dir: str | Path | None = None, *, detect_resolution: int = 512,
                      image_resolution: int | None = None, device: str | torch.device = "cpu") -> Image.Image:
    """Learned line art, white lines on black, RGB (the lineart ControlNet's ``lineart_realistic``). Needs
    ``sk_model.pth``. Sizes as for `hed`."""
    return _lineart(image, "realistic", weights_dir, detect_resolution, image_resolution, device)


def lineart_coarse(image: ImageLike, weights_dir: str | Path | None = None, *, detect_resolution: int = 512,
                   image_resolution: int | None = None, device: str | torch.device = "cpu") -> Image.Image:
    """Learned coarse line art, white lines on black, RGB (the lineart ControlNet's ``lineart_coarse``). Needs
    ``sk_model2.pth``. Sizes as for `hed`."""
    return _lineart(image, "coarse", weights_dir, detect_resolution, image_resolution, device)
