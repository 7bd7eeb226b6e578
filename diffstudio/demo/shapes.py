"""The Shapes world: seeded, captioned images of coloured shapes on plain backgrounds.

A tiny Stable-Diffusion-architecture model is trained on this world, and the engine's
features are tested by their effect on the picture, read back by ``diffstudio.demo.score``.
The world is deliberately easy to read:

* shapes are always saturated colours, backgrounds are always unsaturated (white, black,
  gray, light tints), so "shape pixel" vs "background pixel" is a colour question;
* the six shape colours sit roughly 60 degrees apart in hue;
* each shape sits in one of five position slots; two shapes never touch.

Geometry is in fractions of the image side: ``center=(x, y)`` with (0, 0) the top-left
corner, and ``radius`` = half the side of the shape's bounding box.

Caption grammar (see docs/shapes.md)::

    caption    := shape [" and " shape] [(", " | " on a ") background]
    shape      := "a " [size " "] color " " kind [" " where]
    where      := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    background := name " background" | "split " name " and " name " background"
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------- vocabulary

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Drawn and read like the others but never sampled by default: spare words for tests that
# teach the model something new (e.g. a LoRA that learns "diamond").
EXTRA_KINDS: tuple[str, ...] = ("diamond", "cross")
ALL_KINDS: tuple[str, ...] = KINDS + EXTRA_KINDS

# Saturated colours, hue ~355, 55, 120, 180, 231, 282 degrees (>= 50 degrees apart).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 45),
    "yellow": (240, 220, 20),
    "green": (40, 180, 40),
    "cyan": (20, 200, 200),
    "blue": (40, 70, 235),
    "purple": (170, 50, 220),
}

# Unsaturated backgrounds (chroma <= 0.24), so no background is ever read as a shape colour.
# The three tints sit ~120 degrees apart in hue, >= 65/255 from each other and from white.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "light blue": (195, 210, 250),
    "light pink": (255, 200, 220),
    "light green": (205, 245, 195),
}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SLOT_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (0.09, 0.11), "large": (0.16, 0.18)}
DEFAULT_RADIUS = 0.14  # a shape whose size is unspecified
POSITION_JITTER = 0.04  # +- around the slot centre
EDGE_MARGIN = 0.02  # shapes stay this far inside the image
SHAPE_GAP = 0.06  # two shapes stay at least this far apart
CENTER_BOX = 1 / 6  # |dx|, |dy| below this (from the image centre) reads as "center"

SUPERSAMPLE = 4


# ---------------------------------------------------------------- scene types


@dataclass(frozen=True)
class ShapeSpec:
    """One shape. ``position``/``size`` are words ("" = unspecified, e.g. a parsed prompt);
    ``center``/``radius`` are the exact geometry (None = derived from the words)."""

    kind: str
    color: str
    position: str = ""
    size: str = ""
    center: tuple[float, float] | None = None
    radius: float | None = None

    def geometry(self) -> tuple[tuple[float, float], float]:
        center = self.center or SLOT_CENTERS.get(self.position, (0.5, 0.5))
        if self.radius is not None:
            radius = self.radius
        elif self.size in SIZE_RADII:
            radius = sum(SIZE_RADII[self.size]) / 2
        else:
            radius = DEFAULT_RADIUS
        return center, radius


@dataclass(frozen=True)
class Scene:
    """Shapes on a background: one name, or two names for a split (left half, right half)."""

    shapes: tuple[ShapeSpec, ...]
    background: tuple[str, ...] = ("white",)


@dataclass(frozen=True)
class CaptionStyle:
    """Which optional parts a caption spells out (the scene always has all of them)."""

    position: bool = True
    size: bool = True
    background: bool = True
    on_background: bool = False  # "a red circle on a white background" instead of "a red circle, white background"


def position_of(center: tuple[float, float]) -> str:
    """The position word for a point: "center" inside the middle box, else the dominant axis."""
    dx, dy = center[0] - 0.5, center[1] - 0.5
    if max(abs(dx), abs(dy)) < CENTER_BOX:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def size_of(radius: float) -> str:
    return "large" if radius >= (SIZE_RADII["small"][1] + SIZE_RADII["large"][0]) / 2 else "small"


# ---------------------------------------------------------------- drawing

_STAR_INNER = 0.45  # inner/outer radius of the five-pointed star (fatter than a pentagram)


def unit_polygon(kind: str) -> list[tuple[float, float]]:
    """Outline of ``kind`` in the frame [-1, 1]^2 (y down), upright, touching its left and right
    sides (the star is 5% shorter than wide, centred)."""
    if kind == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if kind == "triangle":
        return [(0, -1), (1, 1), (-1, 1)]
    if kind == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if kind == "star":
        # Outer radius R: width 2R sin72, height R(1 + cos36); scale to width 2, centre the box.
        outer = 1 / np.sin(np.radians(72))
        points = []
        for i in range(10):
            r = outer if i % 2 == 0 else outer * _STAR_INNER
            a = np.radians(-90 + 36 * i)
            points.append((r * np.cos(a), r * np.sin(a)))
        top, bottom = -outer, outer * np.cos(np.radians(36))
        shift = -(top + bottom) / 2
        return [(x, y + shift) for x, y in points]
    if kind == "cross":
        w = 0.34  # half-width of each arm
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    raise ValueError(f"unknown shape kind {kind!r}; known kinds: {', '.join(ALL_KINDS)}")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: tuple[float, float], radius: float,
               scale: float, fill) -> None:
    """Draw one shape; ``center``/``radius`` in fractions, ``scale`` = canvas side in pixels."""
    cx, cy, r = center[0] * scale, center[1] * scale, radius * scale
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    draw.polygon([(cx + x * r, cy + y * r) for x, y in unit_polygon(kind)], fill=fill)


def _rgb(name: str, table: dict[str, tuple[int, int, int]], what: str) -> tuple[int, int, int]:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}")
    return table[name]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size``, anti-aliased (drawn at 4x, box-averaged)."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), _rgb(scene.background[0], BACKGROUNDS, "background"))
    draw = ImageDraw.Draw(canvas)
    if len(scene.background) == 2:
        draw.rectangle([big // 2, 0, big, big], fill=_rgb(scene.background[1], BACKGROUNDS, "background"))
    for shape in scene.shapes:
        center, radius = shape.geometry()
        draw_shape(draw, shape.kind, center, radius, big, _rgb(shape.color, COLORS, "colour"))
    return canvas.resize((size, size), Image.BOX)


# ---------------------------------------------------------------- sampling

_GRID = 128  # resolution of the overlap test between two shapes


def _mask(shape: ShapeSpec) -> np.ndarray:
    img = Image.new("L", (_GRID, _GRID), 0)
    center, radius = shape.geometry()
    draw_shape(ImageDraw.Draw(img), shape.kind, center, radius, _GRID, 255)
    return img


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Boolean dilation by a (2r+1)-square, the window clipped at the border: a MaxFilter(2r+1) in two
    separable passes of window sums (O(pixels), where PIL's rank filter is O(pixels * r^2))."""
    for axis in (0, 1):
        n = mask.shape[axis]
        counts = np.cumsum(np.insert(mask.astype(np.int32), 0, 0, axis=axis), axis=axis)
        hi, lo = np.minimum(np.arange(n) + r + 1, n), np.maximum(np.arange(n) - r, 0)
        mask = (counts.take(hi, axis=axis) - counts.take(lo, axis=axis)) > 0
    return mask


def shapes_apart(a: ShapeSpec, b: ShapeSpec, gap: float = SHAPE_GAP) -> bool:
    """True when the two shapes are at least ``gap`` apart (tested on a 128-pixel grid)."""
    grown = _grow(np.asarray(_mask(a)) > 0, int(round(gap * _GRID)))
    return not np.any(grown & (np.asarray(_mask(b)) > 0))


def _sample_shape(rng: np.random.Generator, position: str, kinds, colors) -> ShapeSpec:
    size = SIZES[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZE_RADII[size]))
    lo, hi = EDGE_MARGIN + radius, 1 - EDGE_MARGIN - radius
    x, y = (float(np.clip(c + rng.uniform(-POSITION_JITTER, POSITION_JITTER), lo, hi))
            for c in SLOT_CENTERS[position])
    return ShapeSpec(kind=kinds[rng.integers(len(kinds))], color=colors[rng.integers(len(colors))],
                     position=position, size=size, center=(x, y), radius=radius)


def sample_background(rng: np.random.Generator, split_prob: float = 0.25) -> tuple[str, ...]:
    names = list(BACKGROUNDS)
    if rng.random() < split_prob:
        i, j = rng.choice(len(names), size=2, replace=False)
        return (names[i], names[j])
    return (names[rng.integers(len(names))],)


def sample_scene(rng: np.random.Generator, max_shapes: int = 2, kinds=KINDS, colors=tuple(COLORS),
                 positions=POSITIONS, split_prob: float = 0.25) -> Scene:
    """A random scene of 1..``max_shapes`` (<= 2) shapes in distinct position slots, never touching."""
    if not 1 <= max_shapes <= 2:
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    kinds, colors, positions = tuple(kinds), tuple(colors), tuple(positions)
    n = int(rng.integers(1, min(max_shapes, len(positions)) + 1))
    for _ in range(100):
        slots = rng.choice(len(positions), size=n, replace=False)
        shapes = tuple(_sample_shape(rng, positions[s], kinds, colors) for s in slots)
        if n == 1 or shapes_apart(shapes[0], shapes[1]):
            break
    else:  # very unlikely: fall back to one shape
        shapes = shapes[:1]
    return Scene(shapes=shapes, background=sample_background(rng, split_prob))


def sample_style(rng: np.random.Generator) -> CaptionStyle:
    """Caption variety, so the model learns each word on its own."""
    return CaptionStyle(position=rng.random() < 0.8, size=rng.random() < 0.5,
                        background=rng.random() < 0.7)


# ---------------------------------------------------------------- captions


def shape_phrase(shape: ShapeSpec, style: CaptionStyle = CaptionStyle()) -> str:
    words = ["a"]
    if style.size and shape.size:
        words.append(shape.size)
    words += [shape.color, shape.kind]
    if style.position and shape.position:
        words.append(POSITION_PHRASES[shape.position])
    return " ".join(words)


def background_phrase(background: tuple[str, ...]) -> str:
    if len(background) == 2:
        return f"split {background[0]} and {background[1]} background"
    return f"{background[0]} background"


def caption(scene: Scene, style: CaptionStyle = CaptionStyle()) -> str:
    """E.g. "a small blue square at the top and a large yellow star on the right, black background"."""
    text = " and ".join(shape_phrase(s, style) for s in scene.shapes)
    if style.background:
        text += (" on a " if style.on_background else ", ") + background_phrase(scene.background)
    return text


_BG_NAMES = "|".join(sorted(BACKGROUNDS, key=len, reverse=True))
_SPLIT_RE = re.compile(rf"\bsplit ({_BG_NAMES}) and ({_BG_NAMES}) background")
_PLAIN_BG_RE = re.compile(rf"\b({_BG_NAMES}) background")
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
                   "centre": "center", "middle": "center"}


def parse_background(text: str) -> tuple[str, ...] | None:
    """The background a caption names, or None when it names none."""
    text = text.lower()
    if m := _SPLIT_RE.search(text):
        return (m.group(1), m.group(2))
    if m := _PLAIN_BG_RE.search(text):
        return (m.group(1),)
    return None


def parse_caption(text: str) -> list[ShapeSpec]:
    """The shapes a caption (or a prompt in the world's vocabulary) asks for.

    Unspecified position/size are "". Clauses are split on "and" and commas; a clause
    without a kind word is ignored (so "a red thing" asks for nothing).
    """
    text = text.lower()
    text = _SPLIT_RE.sub(" , ", text)
    text = _PLAIN_BG_RE.sub(" , ", text)
    shapes = []
    for clause in re.split(r",|\band\b|;", text):
        words = re.findall(r"[a-z]+", clause)
        kind = next((w for w in words if w in ALL_KINDS), None)
        if kind is None:
            continue
        color = next((w for w in words if w in COLORS), "")
        size = next((w for w in words if w in SIZES), "")
        position = next((_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS), "")
        shapes.append(ShapeSpec(kind=kind, color=color, position=position, size=size))
    return shapes


# ---------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    text: str
    scene: Scene


class ShapesDataset:
    """``n`` deterministic samples: item ``i`` depends only on (``seed``, ``i``)."""

    def __init__(self, n: int, size: int = 64, seed: int = 0, max_shapes: int = 2, **scene_kwargs):
        self.n, self.size, self.seed, self.max_shapes = n, size, seed, max_shapes
        self.scene_kwargs = scene_kwargs

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> tuple[Scene, CaptionStyle]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a ShapesDataset of {self.n}")
        rng = np.random.default_rng([self.seed, i])
        scene = sample_scene(rng, self.max_shapes, **self.scene_kwargs)
        return scene, sample_style(rng)

    def sample(self, i: int) -> Sample:
        """Item ``i`` with its scene (the ground truth)."""
        if i < 0:
            i += self.n
        scene, style = self.scene(i)
        return Sample(image=render(scene, self.size), text=caption(scene, style), scene=scene)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        """(image, caption), the pair a trainer reads."""
        sample = self.sample(i)
        return sample.image, sample.text


def write_dataset(folder, n: int, size: int = 64, seed: int = 0, max_shapes: int = 2, progress: bool = True,
                  **scene_kwargs) -> Path:
    """Write ``n`` PNGs and ``metadata.csv`` (columns file_name,text) into ``folder``; return it.

    ``scene_kwargs`` go to ``sample_scene`` (e.g. ``kinds=("diamond",)`` for a LoRA's data)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(n, size=size, seed=seed, max_shapes=max_shapes, **scene_kwargs)
    digits = max(5, len(str(n - 1)))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i in tqdm(range(n), desc="shapes dataset", unit="image", disable=not progress or n < 200):
            image, text = data[i]
            name = f"{i:0{digits}d}.png"
            image.save(folder / name)
            writer.writerow([name, text])
    return folder


# ---------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoClip:
    frames: list[Image.Image]
    scenes: list[Scene]  # per-frame truth (position words follow the moving centre)
    text: str
    info: dict = field(default_factory=dict)


def _lerp_shape(a: ShapeSpec, b: ShapeSpec, t: float) -> ShapeSpec:
    (ca, ra), (cb, rb) = a.geometry(), b.geometry()
    center = (ca[0] + (cb[0] - ca[0]) * t, ca[1] + (cb[1] - ca[1]) * t)
    radius = ra + (rb - ra) * t
    # Colour switches at the half-way frame (a blend would pass through other named hues).
    color = a.color if t < 0.5 else b.color
    return replace(a, color=color, center=center, radius=radius, position=position_of(center),
                   size=size_of(radius))


def render_video(scene_start: Scene, scene_end: Scene | None = None, n_frames: int = 8, size: int = 64,
                 motion: list[tuple[float, float]] | None = None) -> tuple[list[Image.Image], list[Scene]]:
    """Frames where each shape moves linearly from ``scene_start`` to ``scene_end`` (matched by
    index; kinds must agree), or by ``motion[i] = (dx, dy)`` over the whole clip.

    A colour change between the two scenes happens at the middle frame. Returns (frames, per-frame
    scenes); frame k is at t = k / (n_frames - 1).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if scene_end is None:
        motion = motion or [(0.0, 0.0)] * len(scene_start.shapes)
        if len(motion) != len(scene_start.shapes):
            raise ValueError(f"motion has {len(motion)} entries for {len(scene_start.shapes)} shapes")
        moved = []
        for s, (dx, dy) in zip(scene_start.shapes, motion):
            (cx, cy), r = s.geometry()
            moved.append(replace(s, center=(cx + dx, cy + dy), radius=r))
        scene_end = replace(scene_start, shapes=tuple(moved))
    if len(scene_end.shapes) != len(scene_start.shapes) or any(
            a.kind != b.kind for a, b in zip(scene_start.shapes, scene_end.shapes)):
        raise ValueError("scene_start and scene_end must hold the same kinds of shapes, in the same order")
    scenes = []
    for k in range(n_frames):
        t = k / (n_frames - 1) if n_frames > 1 else 0.0
        shapes = tuple(_lerp_shape(a, b, t) for a, b in zip(scene_start.shapes, scene_end.shapes))
        scenes.append(replace(scene_start, shapes=shapes))
    return [render(s, size) for s in scenes], scenes


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def sample_video(rng: np.random.Generator, n_frames: int = 8, size: int = 64, kinds=KINDS,
                 colors=tuple(COLORS), color_change_prob: float = 0.3) -> VideoClip:
    """One shape moving from a side slot to the opposite one (or to the centre), maybe turning
    another colour half-way. Caption e.g. "a red circle moving from the left to the right, turning
    blue, white background"."""
    start_pos = ("left", "right", "top", "bottom")[rng.integers(4)]
    end_pos = _OPPOSITE[start_pos] if rng.random() < 0.7 else "center"
    start = _sample_shape(rng, start_pos, tuple(kinds), tuple(colors))
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    lo, hi = EDGE_MARGIN + start.radius, 1 - EDGE_MARGIN - start.radius
    end_center = tuple(float(np.clip(c + j, lo, hi)) for c, j in zip(SLOT_CENTERS[end_pos], jitter))
    end_color = start.color
    if rng.random() < color_change_prob:
        others = [c for c in colors if c != start.color]
        end_color = others[rng.integers(len(others))]
    end = replace(start, center=end_center, position=end_pos, color=end_color)
    background = sample_background(rng, split_prob=0.0)
    frames, scenes = render_video(Scene((start,), background), Scene((end,), background), n_frames, size)
    text = f"a {start.color} {start.kind} moving from the {start_pos} to the {end_pos}"
    if end_color != start.color:
        text += f", turning {end_color}"
    text += ", " + background_phrase(background)
    return VideoClip(frames=frames, scenes=scenes, text=text,
                     info={"start": start_pos, "end": end_pos, "end_color": end_color})
