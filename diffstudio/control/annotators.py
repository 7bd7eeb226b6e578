"""Control-image annotators: weight-free ones (canny edges, classical line art and soft edges, tile (low-res),
blur, the inpaint hint) and, re-exported from `diffstudio.control.learned`, the learned ones the softedge and
lineart ControlNets were trained with (`hed`, `lineart_realistic`, `lineart_coarse`), which read their weight
files (lllyasviel/Annotators) from ``weights_dir=`` or the folder in ``DIFFSTUDIO_ANNOTATORS``; and, from
`diffstudio.control.detectors`, those run through controlnet-aux from the same folder (`depth`, `openpose`,
`normal`, `mlsd`, `pidinet`).

A ControlNet takes its control image ("hint") as float (B, 3, H, W) in [0, 1] at the generated
image's pixel size (`hint_tensor`); the inpainting ControlNet (control_v11p_sd15_inpaint) takes the
image with masked pixels set to -1 (`inpaint`). Every function accepts what `diffstudio.io.images`
reads (a path, PIL image, array or tensor).

`canny` follows OpenCV's ``cv2.Canny(image, low, high)`` as the ControlNet annotators call it (no
blur; 3x3 Sobel with replicated borders; on a colour image, per pixel the channel with the largest
gradient; L1 magnitude |dx| + |dy|; non-maximum suppression in four directions; hysteresis with
8-connectivity). Canny 1986, "A Computational Approach to Edge Detection".

`lineart` and `softedge` are *classical*, weight-free stand-ins for the learned annotators (`lineart_realistic`,
`hed`). `lineart` is a difference of Gaussians (Marr & Hildreth 1980; Winnemoeller 2011's XDoG without its
threshold): pixels darker than their surroundings become white lines on black. `softedge` is the Sobel gradient
magnitude of the blurred image, scaled to its maximum: soft, thick boundaries as HED draws them. Any callable
``image -> image`` can take their place wherever an annotator is asked for (``ControlNetUnit(preprocess=fn)``,
Diffutoon's ``lineart=fn``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage

from diffstudio.control.detectors import DETECTORS, depth, mlsd, normal, openpose, pidinet  # noqa: F401
from diffstudio.control.learned import (  # noqa: F401
    ANNOTATORS_ENV,
    HED_FILE,
    LINEART_FILES,
    hed,
    lineart_coarse,
    lineart_realistic,
    weights_file,
)
from diffstudio.errors import InvalidInputError
from diffstudio.io.images import ImageLike, load_image, load_mask

_TAN_22_5 = np.tan(np.pi / 8)  # sector bounds of the gradient direction (OpenCV's fixed-point TG22)
_TAN_67_5 = np.tan(3 * np.pi / 8)


def _gradients(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) of an (H, W, C) image: 3x3 Sobel per channel, then per pixel the channel of largest |dx|+|dy|."""
    dx = np.stack([ndimage.sobel(pixels[..., c], axis=1, mode="nearest") for c in range(pixels.shape[-1])], -1)
    dy = np.stack([ndimage.sobel(pixels[..., c], axis=0, mode="nearest") for c in range(pixels.shape[-1])], -1)
    best = np.argmax(np.abs(dx) + np.abs(dy), axis=-1)[..., None]                     # first channel on ties
    return np.take_along_axis(dx, best, -1)[..., 0], np.take_along_axis(dy, best, -1)[..., 0]


def _suppress_non_maxima(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels whose magnitude is a maximum along their gradient direction (ties go to the first pixel)."""
    m = np.pad(mag, 1)                                                               # 0 outside the image
    h, w = mag.shape

    def at(oy: int, ox: int) -> np.ndarray:  # the neighbour at offset (oy, ox) of every pixel
        return m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay < ax * _TAN_22_5
    vertical = ~horizontal & (ay > ax * _TAN_67_5)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx * dy) >= 0                      # gradient along the main diagonal (image y points down)
    keep = horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    return keep


def canny_edges(image: ImageLike, low: float = 100, high: float = 200) -> np.ndarray:
    """Boolean (H, W) edge map of `image` (see the module docstring); thresholds on the L1 Sobel magnitude."""
    if low < 0 or high < 0:
        raise InvalidInputError(f"canny thresholds must be >= 0, got low={low}, high={high}")
    low, high = min(low, high), max(low, high)
    pixels = np.asarray(load_image(image), dtype=np.float64)                           # (H, W, 3), 0-255
    dx, dy = _gradients(pixels)
    mag = np.abs(dx) + np.abs(dy)
    candidates = (mag > low) & _suppress_non_maxima(mag, dx, dy)
    # Hysteresis: keep every 8-connected run of candidates that holds at least one strong pixel.
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    strong = np.zeros(count + 1, dtype=bool)
    strong[np.unique(labels[candidates & (mag > high)])] = True
    strong[0] = False
    return strong[labels]


def canny(image: ImageLike, low: float = 100, high: float = 200) -> Image.Image:
    """The canny ControlNet's control image: white edges on black, RGB, the input's size."""
    edges = canny_edges(image, low, high).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def _gray(image: ImageLike) -> np.ndarray:
    """(H, W) float64 luminance in [0, 1] (ITU-R 601 weights, PIL's "L")."""
    return np.asarray(load_image(image).convert("L"), dtype=np.float64) / 255.0


def _white_on_black(values: np.ndarray) -> Image.Image:
    """(H, W) floats in [0, 1] -> an RGB control image, 1 = white."""
    grey = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def lineart(image: ImageLike, sigma: float = 1.0, ratio: float = 1.6, gain: float = 12.0) -> Image.Image:
    """Classical line art, white lines on black (the lineart ControlNet's input polarity): the difference of
    Gaussians G(ratio * sigma) - G(sigma) of the luminance, positive where a pixel is darker than its
    surroundings (dark strokes, the dark side of an edge), times ``gain``, clipped to [0, 1]. Weight-free:
    not the learned line art the ControlNet was trained on (`lineart_realistic`, which needs its weights).
    """
    if sigma <= 0 or ratio <= 1 or gain <= 0:
        raise InvalidInputError(f"lineart needs sigma > 0, ratio > 1, gain > 0; got {sigma}, {ratio}, {gain}")
    gray = _gray(image)
    dog = ndimage.gaussian_filter(gray, ratio * sigma, mode="nearest") - ndimage.gaussian_filter(
        gray, sigma, mode="nearest")
    return _white_on_black(gain * dog)


def softedge(image: ImageLike, sigma: float = 2.0) -> Image.Image:
    """Classical soft edges, white on black: the Sobel gradient magnitude of the luminance blurred by ``sigma``,
    divided by its maximum (a flat image gives black). Weight-free: not HED, which the softedge
    ControlNet was trained on (`hed`, which needs its weights)."""
    if sigma < 0:
        raise InvalidInputError(f"softedge sigma must be >= 0, got {sigma}")
    gray = ndimage.gaussian_filter(_gray(image), sigma, mode="nearest") if sigma > 0 else _gray(image)
    magnitude = np.hypot(ndimage.sobel(gray, axis=1, mode="nearest"), ndimage.sobel(gray, axis=0, mode="nearest"))
    peak = magnitude.max()
    return _white_on_black(magnitude / peak if peak > 0 else magnitude)


def tile(image: ImageLike, factor: float = 4.0) -> Image.Image:
    """The tile ControlNet's control image: the image averaged down by `factor` and scaled back up
    (bicubic), so it keeps the layout and colours and loses the detail the model is to add."""
    if factor < 1:
        raise InvalidInputError(f"tile factor must be >= 1 (how many times smaller the image is made), got {factor}")
    source = load_image(image)
    small = (max(1, round(source.width / factor)), max(1, round(source.height / factor)))
    return source.resize(small, Image.BOX).resize(source.size, Image.BICUBIC)


def blur(image: ImageLike, radius: float = 4.0) -> Image.Image:
    """A Gaussian-blurred control image (the tile / blur ControlNets' other common input)."""
    if radius < 0:
        raise InvalidInputError(f"blur radius must be >= 0, got {radius}")
    return load_image(image).filter(ImageFilter.GaussianBlur(radius))


def hint_tensor(image: ImageLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A control image -> float (1, 3, H, W) in [0, 1], what `ControlNetModel` takes; ``size`` is
    (width, height) to resize to (bicubic), normally the generated image's."""
    source = load_image(image)
    if size is not None and source.size != tuple(size):
        source = source.resize(tuple(size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(source, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def inpaint(image: ImageLike, mask: ImageLike, fill: float = -1.0) -> torch.Tensor:
    """The inpainting ControlNet's hint: the image in [0, 1] with the pixels to repaint (mask > 0.5,
    white = repaint) set to ``fill``, float (1, 3, H, W). A tensor, since -1 is no pixel value.
    ``fill=0.0`` (masked pixels black) is the ControlNet-Union ProMax's repaint hint."""
    hint = hint_tensor(image)
    mask = load_mask(mask, size=(hint.shape[-1], hint.shape[-2]))                      # (1, 1, H, W)
    return hint.masked_fill(mask > 0.5, fill)


def weight_files(kind: str) -> tuple[str, ...]:
    """The lllyasviel/Annotators files the annotator ``kind`` reads; none for the weight-free ones."""
    if kind == "hed":
        return (HED_FILE,)
    if kind.removeprefix("lineart_") in LINEART_FILES:
        return (LINEART_FILES[kind.removeprefix("lineart_")],)
    return DETECTORS[kind].files if kind in DETECTORS else ()


def check_weight_files(kind: str, weights_dir=None) -> None:
    """Raise ``AnnotatorWeightsNotFoundError`` (naming the file to fetch) now, before any work, if the annotator
    ``kind`` reads a file that is not in ``weights_dir`` (default: $DIFFSTUDIO_ANNOTATORS)."""
    for filename in weight_files(kind):
        weights_file(filename, weights_dir, f"the {kind} annotator")

