"""Read a Shapes-world image back: which shapes, what colour, where, how big.

Plain image analysis, built to survive what a small generative model does to a picture
(soft edges, slightly-off colours, noise). Measured accuracy: docs/shapes.md.

1. **Background.** The median of the border pixels, separately for the left and right parts
   of the border; if the two differ the background is split down the middle.
2. **Foreground.** A pixel belongs to a shape when it is far (RGB distance > 0.2) from the
   background, measured to the segment between the two background colours, so a soft split
   line is never foreground. ``scipy.ndimage.label`` gives the components; one whose solid
   pixels fall into two hue classes, each a large share, is cut in two (touching shapes).
3. **Colour.** The median colour of a component's core pixels, named by its nearest hue
   among the six shape colours (>= 50 degrees apart, so ~25 degrees of drift is tolerated).
   Grey blobs (chroma < 0.15) are not shapes.
4. **Alpha.** Every pixel is unmixed: alpha = projection of (pixel - background) onto
   (shape colour - background): how much of the pixel the shape covers, whatever the blur.
   Each shape keeps the alpha of the pixels nearer to it than to any other shape.
5. **Kind, by analysis by synthesis.** Blur keeps a shape's mass, centroid and second moments
   (its variance grows by sigma^2). For each kind and each candidate blur sigma the moments
   give the kind's box; the kind is drawn in that box, blurred by sigma, and compared with the
   alpha map (L1). The best (kind, sigma) wins; a blob no kind draws well is not a shape.
6. **Position** from the fitted box's centre (the world's ``position_of``), **size** from its
   longer side.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from .shapes import (
    ALL_KINDS,
    BACKGROUNDS,
    COLORS,
    KINDS,
    SIZE_RADII,
    ShapesDataset,
    ShapeSpec,
    draw_shape,
    parse_background,
    parse_caption,
    position_of,
    unit_polygon,
)

__all__ = [
    "DetectedShape", "read_image", "read_background", "score_prompt", "parse_caption", "dominant_color",
    "color_fractions", "color_name", "perturb", "calibrate",
]

FG_DISTANCE = 0.2  # RGB distance (0..sqrt 3) from the background that makes a pixel foreground
MIN_AREA = 0.003  # blobs smaller than this fraction of the image are dropped
MIN_CHROMA = 0.15  # a component less colourful than this is not a shape
MAX_FIT_ERROR = 1.0  # a blob no kind draws better than this is not a shape (shapes: < 0.6)
NOISE_ALPHA = 0.02  # smoothed alpha below this is background noise
REGION_MARGIN = 0.12  # a shape's alpha is read this far (fraction of the side) around it
SPLIT_DISTANCE = 0.12  # left/right border medians further apart than this: a split background
# Longer bbox side (fraction of the image) between the small and large ranges (stars are 0.95 wide).
LARGE_EXTENT = SIZE_RADII["small"][1] + SIZE_RADII["large"][0] - 0.01


@dataclass(frozen=True)
class DetectedShape:
    """A shape read from an image. Geometry in fractions of the image side, (0, 0) = top-left."""

    kind: str
    color: str
    position: str
    area: float  # fraction of the image covered (sum of alpha)
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    centroid: tuple[float, float]  # alpha-weighted (x, y)
    size: str  # "small" or "large"
    rgb: tuple[int, int, int]  # the shape's measured colour
    fit_error: float  # mismatch between the shape and the drawn kind (0 = perfect, ~0.1 typical)


# ---------------------------------------------------------------- input and colour


def to_array(image) -> np.ndarray:
    """PIL image, or an array / torch tensor (HWC or CHW; uint8, or float in [0, 1]) -> HxWx3 float."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an RGB image (HxWx3 or 3xHxW), got an array of shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < -0.01 or arr.max() > 1.01:
        raise ValueError(f"float images must lie in [0, 1] (got {arr.min():.2f}..{arr.max():.2f}); "
                         "convert a [-1, 1] model output with (x + 1) / 2")
    return np.clip(arr, 0.0, 1.0)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of (..., 3) RGB in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn > 1e-6, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


_COLOR_NAMES = list(COLORS)
_COLOR_HUES = _hue(np.array(list(COLORS.values()), dtype=np.float32) / 255.0)


def _hue_class(rgb: np.ndarray) -> np.ndarray:
    """Index into the shape colours of the nearest hue, for (..., 3) RGB."""
    diff = np.abs(_hue(rgb)[..., None] - _COLOR_HUES)
    return np.minimum(diff, 360 - diff).argmin(-1)


def color_name(rgb) -> str | None:
    """The shape colour nearest in hue to ``rgb`` (0..255 or 0..1), or None for a grey."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    if rgb.max() - rgb.min() < MIN_CHROMA:
        return None
    return _COLOR_NAMES[int(_hue_class(rgb))]


# ---------------------------------------------------------------- background


@dataclass(frozen=True)
class Background:
    left: np.ndarray  # RGB in [0, 1]
    right: np.ndarray  # equal to left when not split

    @property
    def split(self) -> bool:
        return bool(np.linalg.norm(self.left - self.right) > SPLIT_DISTANCE)

    @property
    def names(self) -> tuple[str, ...]:
        def nearest(c):
            return min(BACKGROUNDS, key=lambda n: np.linalg.norm(np.array(BACKGROUNDS[n]) / 255.0 - c))
        return (nearest(self.left), nearest(self.right)) if self.split else (nearest(self.left),)


def _estimate_background(arr: np.ndarray) -> Background:
    h, w, _ = arr.shape
    b = max(1, round(min(h, w) / 32))  # border thickness: 2 px at 64
    border = np.zeros((h, w), bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    xs = np.broadcast_to(np.arange(w)[None, :], (h, w))
    left = np.median(arr[border & (xs < 0.4 * w)], axis=0)
    right = np.median(arr[border & (xs >= 0.6 * w)], axis=0)
    if np.linalg.norm(left - right) <= SPLIT_DISTANCE:
        left = right = np.median(arr[border], axis=0)
    return Background(left, right)


def read_background(image) -> tuple[str, ...]:
    """The background's name(s): ("white",) or, split down the middle, ("white", "gray")."""
    return _estimate_background(to_array(image)).names


def _nearest_on_segment(arr: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((arr - a) @ ab) / max(float(ab @ ab), 1e-8), 0.0, 1.0)
    return a + t[..., None] * ab


def _distance_to_segment(arr: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(arr - _nearest_on_segment(arr, a, b), axis=-1)


def _local_background(arr: np.ndarray, bg: Background) -> np.ndarray:
    """The background colour behind every pixel. Along a split line, softened by blur, it is
    the mix of the two colours nearest the pixel (so the line itself is no shape's mass)."""
    h, w, _ = arr.shape
    xs = np.arange(w) + 0.5
    local = np.broadcast_to(np.where((xs < w / 2)[None, :, None], bg.left, bg.right), arr.shape).copy()
    if bg.split:
        band = np.abs(xs - w / 2) < 3 * w / 64
        local[:, band] = _nearest_on_segment(arr[:, band], bg.left, bg.right)
    return local


# ---------------------------------------------------------------- kinds (analysis by synthesis)


@dataclass(frozen=True)
class _Moments:
    """A kind drawn in the unit box [0, 1]^2: fill fraction, centroid and per-axis variance."""

    fill: float
    mean: tuple[float, float]
    var: tuple[float, float]


def _moments(m: np.ndarray) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Mass, centroid (x, y) and variance (x, y) of a 2-D map, in pixels (centres at +0.5)."""
    h, w = m.shape
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    total = float(m.sum())
    mx, my = float(m.sum(0) @ xs) / total, float(m.sum(1) @ ys) / total
    vx, vy = float(m.sum(0) @ (xs - mx) ** 2) / total, float(m.sum(1) @ (ys - my) ** 2) / total
    return total, (mx, my), (vx, vy)


@cache
def _unit_moments(kind: str) -> _Moments:
    side = 512
    img = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(img), kind, (0.5, 0.5), 0.5, side, 255)
    total, mean, var = _moments(np.asarray(img, dtype=np.float64) / 255.0)
    return _Moments(fill=total / side**2, mean=(mean[0] / side, mean[1] / side),
                    var=(var[0] / side**2, var[1] / side**2))


def _draw_alpha(kind: str, box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """``kind`` stretched over ``box`` (x0, y0, width, height in pixels), anti-aliased, in [0, 1]."""
    h, w = shape
    ss = 4
    img = Image.new("L", (w * ss, h * ss), 0)
    x0, y0, bw, bh = (v * ss for v in box)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
    else:
        draw.polygon([(x0 + (x + 1) / 2 * bw, y0 + (y + 1) / 2 * bh) for x, y in unit_polygon(kind)],
                     fill=255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


BLUR_SIGMAS = (0.0, 0.4, 0.7, 1.0, 1.2, 1.4, 1.7, 2.0, 2.4)  # candidate blurs, in pixels at 64 x 64


@dataclass(frozen=True)
class KindFit:
    kind: str
    error: float  # sum |alpha - drawing| / area: 0 = perfect
    box: tuple[float, float, float, float]  # x0, y0, width, height in pixels
    sigma: float
    errors: dict  # best error of every candidate kind


def fit_kind(alpha: np.ndarray, kinds=KINDS, sigma_scale: float = 1.0) -> KindFit | None:
    """Fit every kind (at every candidate blur, ``BLUR_SIGMAS`` x ``sigma_scale`` pixels) to a
    soft mask ``alpha`` in [0, 1] (zero outside the shape). None when empty."""
    ys, xs = np.nonzero(alpha > 0)
    if len(xs) == 0:
        return None
    # Work on a window around the shape (wide enough for the largest blur's tails).
    pad = int(np.ceil(2 * BLUR_SIGMAS[-1] * sigma_scale))
    ox, oy = max(0, xs.min() - pad), max(0, ys.min() - pad)
    window = alpha[oy:ys.max() + pad + 1, ox:xs.max() + pad + 1]
    total, (cx, cy), (vx, vy) = _moments(window)
    if total <= 1.0:
        return None
    # Less the 1/12 px^2 of pixel averaging (the drawings carry it too).
    vx, vy = vx - 1 / 12, vy - 1 / 12
    best, errors = None, {}
    for kind in kinds:
        unit = _unit_moments(kind)
        for sigma in (v * sigma_scale for v in BLUR_SIGMAS):
            ex, ey = vx - sigma**2, vy - sigma**2
            if ex <= 0 or ey <= 0:
                break
            bw, bh = (ex / unit.var[0]) ** 0.5, (ey / unit.var[1]) ** 0.5
            box = (cx - unit.mean[0] * bw, cy - unit.mean[1] * bh, bw, bh)
            drawing = _draw_alpha(kind, box, window.shape)
            if sigma > 0:
                drawing = ndimage.gaussian_filter(drawing, sigma, mode="constant")
            error = float(np.abs(window - drawing).sum()) / total
            errors[kind] = min(errors.get(kind, np.inf), error)
            if best is None or error < best.error:
                best = KindFit(kind, error, (box[0] + ox, box[1] + oy, bw, bh), sigma, errors)
    return best


# ---------------------------------------------------------------- reading


def _split_by_hue(arr: np.ndarray, dist: np.ndarray, comp: np.ndarray, min_px: int) -> list[np.ndarray]:
    """One mask per shape colour in the component when two colours each hold a large share of
    its solid pixels (edge pixels, mixed with the background, may drift in hue: not counted)."""
    solid = comp & (dist >= 0.5 * dist[comp].max())
    classes = _hue_class(arr[solid])
    counts = np.bincount(classes, minlength=len(_COLOR_NAMES))
    big = [c for c in np.argsort(-counts) if counts[c] >= max(min_px, 0.25 * solid.sum())]
    if len(big) < 2:
        return [comp]
    cls_map = np.full(comp.shape, -1)
    cls_map[comp] = _hue_class(arr[comp])
    parts = []
    for c in big:
        labels, n = ndimage.label(cls_map == c)
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
        parts.append(labels == 1 + int(np.argmax(sizes)))
    return parts


WORKING_SIDE = 128  # larger images are box-downsampled to this before reading


def _working_array(image) -> np.ndarray:
    arr = to_array(image)
    h, w, _ = arr.shape
    if max(h, w) <= WORKING_SIDE:
        return arr
    scale = WORKING_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).resize(size, Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _shape_pieces(arr, dist, comps, local_bg, min_px):
    """(colour name, rgb, piece mask, alpha map) per shape: a component's alpha >= 0.5 pixels can
    fall apart into several same-colour shapes that only blur joined."""
    pieces = []
    for comp in comps:
        core = comp & (dist >= np.percentile(dist[comp], 50))
        color = np.median(arr[core], axis=0)
        name = color_name(color)
        if name is None:
            continue
        # Unmix: pixel = alpha * colour + (1 - alpha) * background.
        diff = color - local_bg
        alpha = ((arr - local_bg) * diff).sum(-1) / np.maximum((diff * diff).sum(-1), 1e-4)
        near = ndimage.binary_dilation(comp, iterations=2)
        labels, n = ndimage.label((alpha >= 0.5) & near)
        for i in range(1, n + 1):
            piece = labels == i
            if piece.sum() >= min_px:
                pieces.append((name, color, piece, alpha))
    return pieces


def _shape_alpha(alpha: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The shape's alpha map: its region, less the pixels where (lightly smoothed) alpha is
    indistinguishable from background noise; clipped to [0, 1]."""
    smooth = ndimage.gaussian_filter(np.where(region, alpha, 0.0), 1.0)
    return np.where(region & (smooth > NOISE_ALPHA), np.clip(alpha, 0.0, 1.0), 0.0)


def read_image(image, kinds=KINDS, min_area: float = MIN_AREA) -> list[DetectedShape]:
    """Every shape in ``image``, largest first. ``kinds`` are the candidates for the kind."""
    arr = _working_array(image)
    h, w, _ = arr.shape
    bg = _estimate_background(arr)
    dist = _distance_to_segment(arr, bg.left, bg.right)
    local_bg = _local_background(arr, bg)
    min_px = max(4, int(min_area * h * w))
    labels, n = ndimage.label(dist > FG_DISTANCE)
    comps = []
    for i in range(1, n + 1):
        comp = labels == i
        if comp.sum() >= min_px:
            comps += [p for p in _split_by_hue(arr, dist, comp, min_px) if p.sum() >= min_px]
    pieces = _shape_pieces(arr, dist, comps, local_bg, min_px)
    # Each shape owns the pixels within REGION_MARGIN of it that are nearer to it than to any
    # other shape: room for the tails of a strong blur, none of a neighbour's.
    reach = [ndimage.distance_transform_edt(~piece) for _, _, piece, _ in pieces]
    nearest = np.argmin(reach, axis=0) if reach else None
    margin = REGION_MARGIN * max(h, w)
    sigma_scale = max(h, w) / 64
    found = []
    for k, (name, color, _, alpha) in enumerate(pieces):
        alpha = _shape_alpha(alpha, (nearest == k) & (reach[k] <= margin))
        fit = fit_kind(alpha, kinds, sigma_scale)
        if fit is None or fit.error > MAX_FIT_ERROR:
            continue
        x0, y0, bw, bh = fit.box
        bbox = (x0 / w, y0 / h, (x0 + bw) / w, (y0 + bh) / h)
        center = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        total, (mx, my), _ = _moments(alpha)
        centroid = (mx / w, my / h)
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        found.append(DetectedShape(
            kind=fit.kind, color=name, position=position_of(center), area=total / (h * w),
            bbox=tuple(float(v) for v in bbox), centroid=centroid,
            size="large" if extent >= LARGE_EXTENT else "small",
            rgb=tuple(int(round(v * 255)) for v in color), fit_error=fit.error))
    return sorted(found, key=lambda s: -s.area)


# ---------------------------------------------------------------- prompts


def _match(want: ShapeSpec, got: DetectedShape) -> dict[str, bool]:
    """Which attributes of ``want`` ``got`` satisfies; unspecified ones count as satisfied."""
    return {
        "color_ok": not want.color or got.color == want.color,
        "kind_ok": got.kind == want.kind,
        "position_ok": not want.position or got.position == want.position,
        "size_ok": not want.size or got.size == want.size,
    }


def _rank(m: dict[str, bool]) -> tuple:
    # Colour matters most, then kind, then position, then size (lexicographic).
    return (sum(m.values()), m["color_ok"], m["kind_ok"], m["position_ok"], m["size_ok"])


def score_prompt(image, prompt: str) -> dict:
    """Does ``image`` show what ``prompt`` (in the world's vocabulary) asks for?

    Each shape the prompt asks for is paired with a distinct detected shape (the pairing that
    satisfies most attributes, colour first). Returns ``color_ok``, ``kind_ok``, ``position_ok``,
    ``size_ok`` (each True only if it holds for every asked shape; an attribute the prompt leaves
    out is satisfied), ``background_ok`` (None when the prompt names no background), ``count_ok``
    (as many shapes as asked), ``all_ok``, and ``detected`` (the shapes read).
    """
    wanted = parse_caption(prompt)
    if not wanted:
        raise ValueError(f"the prompt {prompt!r} names no shape kind ({', '.join(ALL_KINDS)})")
    kinds = tuple(dict.fromkeys(KINDS + tuple(s.kind for s in wanted)))
    detected = read_image(image, kinds=kinds)
    keys = ("color_ok", "kind_ok", "position_ok", "size_ok")
    best = None
    if len(detected) >= len(wanted):
        for chosen in permutations(detected, len(wanted)):
            ms = [_match(w, d) for w, d in zip(wanted, chosen)]
            rank = tuple(sum(x) for x in zip(*(_rank(m) for m in ms)))
            if best is None or rank > best[0]:
                best = (rank, ms)
    else:  # fewer shapes than asked: pair what there is, the rest fail
        for chosen in permutations(range(len(wanted)), len(detected)):
            ms = [{k: False for k in keys} for _ in wanted]
            for w_index, d in zip(chosen, detected):
                ms[w_index] = _match(wanted[w_index], d)
            rank = tuple(sum(x) for x in zip(*(_rank(m) for m in ms)))
            if best is None or rank > best[0]:
                best = (rank, ms)
    result = {k: all(m[k] for m in best[1]) for k in keys}
    want_bg = parse_background(prompt)
    result["background_ok"] = None if want_bg is None else read_background(image) == want_bg
    result["count_ok"] = len(detected) == len(wanted)
    result["all_ok"] = all(result[k] for k in keys) and result["background_ok"] is not False
    result["detected"] = detected
    return result


# ---------------------------------------------------------------- colour by region

_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "center": (1 / 3, 1 / 3, 2 / 3, 2 / 3),
}
DOMINANT_CHROMA = 0.3  # pixels at least this colourful count for dominant_color


def color_fractions(image, region=None) -> dict[str, float]:
    """Fraction of the region's pixels of each shape colour (pixels with chroma >= 0.3).

    ``region``: None (whole image), "left"/"right"/"top"/"bottom" (halves), "center" (middle
    third), or (x0, y0, x1, y1) in fractions of the image.
    """
    arr = to_array(image)
    h, w, _ = arr.shape
    x0, y0, x1, y1 = _REGIONS[region] if isinstance(region, str) else (region or (0.0, 0.0, 1.0, 1.0))
    px = arr[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))].reshape(-1, 3)
    if len(px) == 0:
        raise ValueError(f"region {region!r} holds no pixels of a {w}x{h} image")
    chromatic = px.max(-1) - px.min(-1) >= DOMINANT_CHROMA
    counts = np.bincount(_hue_class(px[chromatic]), minlength=len(_COLOR_NAMES)) if chromatic.any() \
        else np.zeros(len(_COLOR_NAMES))
    return {name: float(c) / len(px) for name, c in zip(_COLOR_NAMES, counts)}


def dominant_color(image, region=None, min_fraction: float = 0.02) -> str | None:
    """The shape colour covering most of ``region`` (see ``color_fractions``), or None when no
    colour covers ``min_fraction`` of it (a bare background)."""
    fractions = color_fractions(image, region)
    name = max(fractions, key=fractions.get)
    return name if fractions[name] >= min_fraction else None


# ---------------------------------------------------------------- calibration

PERTURBATIONS = ("clean", "blur", "noise", "color_shift", "resample", "all")


def perturb(image: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    """Degrade an image the way a small generative model might.

    blur: Gaussian, sigma 1 px at 64 (scaled with the image); noise: Gaussian, std 8/255;
    color_shift: per-channel offsets +-15/255 and saturation x0.85; resample: down to half
    size and back up (bilinear); all: every one of these, in that order.
    """
    if how == "clean":
        return image
    if how == "all":
        for step in ("blur", "resample", "color_shift", "noise"):
            image = perturb(image, step, rng)
        return image
    if how == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=image.width / 64))
    if how == "resample":
        half = (max(1, image.width // 2), max(1, image.height // 2))
        return image.resize(half, Image.BILINEAR).resize(image.size, Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if how == "noise":
        arr = arr + rng.normal(0.0, 8 / 255, arr.shape)
    elif how == "color_shift":
        mean = arr.mean(-1, keepdims=True)
        arr = mean + 0.85 * (arr - mean) + rng.uniform(-15 / 255, 15 / 255, 3)
    else:
        raise ValueError(f"unknown perturbation {how!r}; known: {', '.join(PERTURBATIONS)}")
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))


def _pair(truth: tuple[ShapeSpec, ...], detected: list[DetectedShape]) -> list[DetectedShape | None]:
    """Each true shape's detection: the nearest bbox centre within 0.15 of its centre."""
    out, used = [], set()
    for s in truth:
        (cx, cy), _ = s.geometry()
        best, best_d = None, 0.15
        for j, d in enumerate(detected):
            dx, dy = (d.bbox[0] + d.bbox[2]) / 2 - cx, (d.bbox[1] + d.bbox[3]) / 2 - cy
            if j not in used and (dx * dx + dy * dy) ** 0.5 < best_d:
                best, best_d = j, (dx * dx + dy * dy) ** 0.5
        if best is not None:
            used.add(best)
        out.append(None if best is None else detected[best])
    return out


def calibrate(n: int = 500, seed: int = 1234, size: int = 64, perturbations=PERTURBATIONS,
              max_shapes: int = 2) -> dict:
    """Read ``n`` dataset images (and degraded copies) back and compare with the scene truth.

    Returns {"n_images", "n_shapes", "accuracy": {perturbation: {"color", "kind", "position",
    "size", "background", "count"}}, "kind_confusion": {perturbation: {true: {read: count}}}}.
    Per-shape accuracies count a shape that was not found as wrong; "count" and "background" are
    per image.
    """
    data = ShapesDataset(n, size=size, seed=seed, max_shapes=max_shapes)
    attrs = ("color", "kind", "position", "size")
    hits = {p: dict.fromkeys(attrs + ("background", "count"), 0) for p in perturbations}
    confusion = {p: {k: dict.fromkeys(KINDS + ("missed",), 0) for k in KINDS} for p in perturbations}
    n_shapes = 0
    for i in range(n):
        sample = data.sample(i)
        truth = sample.scene.shapes
        n_shapes += len(truth)
        for p in perturbations:
            image = perturb(sample.image, p, np.random.default_rng([seed, i, len(p)]))
            detected = read_image(image)
            hits[p]["count"] += len(detected) == len(truth)
            hits[p]["background"] += read_background(image) == sample.scene.background
            for s, d in zip(truth, _pair(truth, detected)):
                confusion[p][s.kind]["missed" if d is None else d.kind] += 1
                if d is not None:
                    for a in attrs:
                        hits[p][a] += getattr(d, a) == getattr(s, a)
    accuracy = {}
    for p in perturbations:
        accuracy[p] = {a: hits[p][a] / n_shapes for a in attrs}
        accuracy[p].update(background=hits[p]["background"] / n, count=hits[p]["count"] / n)
    return {"n_images": n, "n_shapes": n_shapes, "accuracy": accuracy, "kind_confusion": confusion}
