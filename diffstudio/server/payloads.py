"""Images in requests and responses: base64 PNG/JPEG/WebP (A1111's convention), with a pixel limit; other files
(a video to re-render) as base64 bytes.

A client's image is decoded only after its header says its size is within the server's pixel limit, so a
small file that would expand to gigabytes (a "decompression bomb") is refused before it is read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from diffstudio.errors import InvalidInputError, InvalidSizeError

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def check_pixels(width: int, height: int, max_pixels: int, what: str = "the image") -> None:
    if width * height > max_pixels:
        raise InvalidSizeError(f"{what} is {width}x{height} = {width * height} pixels; this server takes at most "
                               f"{max_pixels} (its --max-pixels setting)")


def decode_bytes(data: object, what: str, kind: str = "file") -> bytes:
    """A base64 string (a ``data:...;base64,`` prefix allowed) -> its bytes; ``kind`` names what it should hold."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidInputError(f"{what} must be a base64-encoded {kind} as a string")
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{what} is not valid base64 (A-Z, a-z, 0-9, '+', '/', padded with '=')") from None


def decode_image(data: object, what: str, max_pixels: int) -> Image.Image:
    """A base64 string (a ``data:image/...;base64,`` prefix allowed) -> a PIL image, fully read."""
    raw = decode_bytes(data, what, "image (PNG, JPEG or WebP)")
    try:
        image = Image.open(io.BytesIO(raw))
        check_pixels(image.width, image.height, max_pixels, what)
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise InvalidInputError(f"{what} decodes from base64 but is not an image Pillow can read ({err})") from None
    return image


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_file(path: Path) -> str:
    """A file's bytes as base64 text (the PNGs the server wrote, recipe chunks included)."""
    return encode_bytes(path.read_bytes())


def png_text_chunks(data: object, max_pixels: int) -> dict[str, str]:
    """The text chunks of a base64 image (``parameters``, ``diffstudio`` ...)."""
    image = decode_image(data, "image", max_pixels)
    return {str(k): str(v) for k, v in (getattr(image, "text", None) or image.info).items() if isinstance(v, str)}
