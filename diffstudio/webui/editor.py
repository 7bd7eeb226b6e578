"""Gradio image-editor values (``{"background", "layers", "composite"}``, PIL images) -> what a request needs.

A brush stroke is wherever a layer is not transparent: the img2img editor's layers together are the
inpainting mask (white = repaint), and in the region painter layer *i* is region *i*'s mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _layers(value) -> list:
    return list((value or {}).get("layers") or []) if isinstance(value, dict) else []


def background(value) -> Image.Image | None:
    """The editor's picture (the upload), RGB; None when it holds none."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None
    image = _as_image(value["background"])
    return flatten(image) if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")


def flatten(image: Image.Image) -> Image.Image:
    """RGBA on white -> RGB (a transparent upload reads as white, not black)."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, "white")
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def layer_mask(layer, size: tuple[int, int] | None = None) -> Image.Image | None:
    """One layer's strokes as an L mask (255 where painted); None when nothing is painted."""
    if layer is None:
        return None
    image = _as_image(layer).convert("RGBA")
    alpha = np.asarray(image.getchannel("A"))
    if not alpha.any():
        return None
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L")
    return mask if size is None or mask.size == size else mask.resize(size, Image.NEAREST)


def painted_mask(value) -> Image.Image | None:
    """The union of all layers' strokes (the inpainting mask); None when nothing is painted."""
    masks = [m for m in (layer_mask(layer) for layer in _layers(value)) if m is not None]
    if not masks:
        return None
    union = np.zeros(masks[0].size[::-1], np.uint8)
    for mask in masks:
        union = np.maximum(union, np.asarray(mask.resize(masks[0].size, Image.NEAREST)))
    return Image.fromarray(union, "L")


def layer_masks(value, count: int) -> list[Image.Image | None]:
    """The first ``count`` layers' masks, in layer order (None for a layer with nothing painted or missing)."""
    layers = _layers(value)
    return [layer_mask(layers[i]) if i < len(layers) else None for i in range(count)]


def mask_layer(mask: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """A mask drawn as an editor layer: ``color`` where the mask is white, transparent elsewhere."""
    alpha = mask.convert("L")
    layer = Image.new("RGBA", alpha.size, (*color, 0))
    layer.putalpha(alpha.point(lambda v: 255 if v >= 128 else 0))
    solid = Image.new("RGBA", alpha.size, (*color, 255))
    return Image.composite(solid, layer, layer.getchannel("A"))


def blank_canvas(width: int, height: int) -> dict:
    """An empty editor value of a size (the region painter's canvas: the output's size)."""
    return {"background": Image.new("RGB", (width, height), "white"), "layers": [], "composite": None}


def _as_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)
