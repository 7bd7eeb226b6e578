"""Images in and out: files, PIL images, arrays and tensors <-> the tensors the models see.

Conventions (the whole engine uses them):

* image tensors are float ``(B, 3, H, W)`` in ``[-1, 1]`` (what the VAE encodes and decodes);
* masks are float ``(1, 1, H, W)`` in ``[0, 1]``, **white (1) = repaint**, black (0) = keep;
* sizes are given PIL-style as ``(width, height)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffstudio.errors import CorruptFileError, InvalidSizeError, NaNError, UnsupportedFormatError
from diffstudio.io.folders import existing_path

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def _open_image_file(path: str | Path) -> Image.Image:
    path = existing_path(path, "image")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise UnsupportedFormatError(f"{path}: not an image format Pillow can read (PNG, JPEG, "
                                     "WebP ...)") from None
    except OSError as err:
        raise CorruptFileError(f"{path}: the image is damaged or truncated ({err}) — save it again") from None
    return ImageOps.exif_transpose(image)  # a phone photo's rotation flag becomes real pixels


def _over_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white (transparent pixels often hide arbitrary colours)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 arrays pass; float/bool arrays are read as [0, 1] and scaled."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or np.issubdtype(array.dtype, np.floating):
        return (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    raise TypeError(f"an image array must be uint8 (0-255) or float/bool (0-1), not {array.dtype}")


def _tensor_to_single_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) or (1, 3, H, W) tensor: float in [-1, 1], or uint8 in [0, 255]."""
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise TypeError(f"an image tensor must be (3, H, W) or (1, 3, H, W), not {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        array = tensor.permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
    return tensor_to_images(tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor)[0]


def load_image(source: ImageLike) -> Image.Image:
    """Any image source -> an RGB PIL image.

    Accepts a path, a PIL image (transparency is flattened onto white), a NumPy array (H, W) or
    (H, W, 3|4) as uint8 0-255 or float 0-1, or a tensor (3, H, W) / (1, 3, H, W) as float in
    [-1, 1] (the engine's convention) or uint8.
    """
    if isinstance(source, (str, Path)):
        source = _open_image_file(source)
    if isinstance(source, Image.Image):
        if source.mode in ("RGBA", "LA", "PA") or (source.mode == "P" and "transparency" in source.info):
            return _over_white(source)
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        array = _array_to_uint8(source)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise TypeError(f"an image array must be (H, W) or (H, W, 3|4), not {array.shape}")
        return load_image(Image.fromarray(array))
    if isinstance(source, torch.Tensor):
        return _tensor_to_single_image(source.detach())
    raise TypeError(f"cannot read an image from a {type(source).__name__}; pass a path, PIL image, array "
                    "or tensor")


def load_mask(source: ImageLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask -> float tensor (1, 1, H, W) in [0, 1]; white (1) = repaint, black (0) = keep.

    ``size`` is (width, height); the mask is resized to it (bilinear, so edges stay soft).
    Sources: a path or PIL image (converted to greyscale), a (H, W) array (uint8, bool, or float
    0-1) or a tensor (H, W) / (1, H, W) / (1, 1, H, W) with values in [0, 1].
    """
    if isinstance(source, torch.Tensor):
        mask = source.detach().float().cpu()
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        if mask.shape[:2] != (1, 1):
            raise TypeError("a mask tensor must be (H, W), (1, H, W) or (1, 1, H, W), not "
                            f"{tuple(source.shape)}")
        mask = mask.clamp(0, 1)
        if size is not None and (mask.shape[-1], mask.shape[-2]) != tuple(size):
            mask = torch.nn.functional.interpolate(mask, size=(size[1], size[0]), mode="bilinear",
                                                   align_corners=False)
        return mask
    if isinstance(source, (str, Path)):
        source = _open_image_file(source)
    if isinstance(source, np.ndarray):
        array = _array_to_uint8(source)
        source = Image.fromarray(array if array.ndim == 2 else array[..., 0])
    if not isinstance(source, Image.Image):
        raise TypeError(f"cannot read a mask from a {type(source).__name__}; pass a path, PIL image, array "
                        "or tensor")
    grey = source.convert("L")
    if size is not None and grey.size != tuple(size):
        grey = grey.resize(tuple(size), Image.BILINEAR)
    values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    return values[None, None]


def images_to_tensor(images: Image.Image | Sequence[ImageLike]) -> torch.Tensor:
    """RGB images of one size -> float32 (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    pil = [load_image(im) for im in images]
    if not pil:
        raise ValueError("images_to_tensor needs at least one image")
    sizes = {im.size for im in pil}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise InvalidSizeError(f"images in one batch must share a size, got {shown}; resize them first")
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in pil])  # (B, H, W, 3) in 0..255
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> RGB PIL images (values clamped, then rounded).

    Raises NaNError when the tensor holds NaN/inf: a silent black image hides the real problem.
    """
    t = tensor.detach().float().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 3:
        raise TypeError(f"expected (B, 3, H, W) or (3, H, W), got {tuple(tensor.shape)}")
    if not torch.isfinite(t).all():
        raise NaNError("the image tensor holds NaN or inf values (often fp16 overflow in the VAE); "
                       "decode in float32 or bfloat16")
    pixels = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]
