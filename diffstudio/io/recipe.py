"""The generation recipe stored in image files, readable by diffstudio and by the A1111 ecosystem.

:func:`save_image` writes the format the file name asks for (.png, .jpg / .jpeg, .webp; other
suffixes are refused) and stores the recipe twice. A PNG gets two text chunks:

* ``parameters`` — AUTOMATIC1111's "infotext", which image sites and other UIs parse::

      a red circle
      Negative prompt: blurry
      Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

  Values holding ``,`` ``:`` or a newline are JSON-quoted, as A1111 does.
* ``diffstudio`` — the full recipe as JSON (sigmas, family, batch index ...), the source of truth.

A JPEG or WebP carries the same two texts where those formats have room for them: the A1111
text in the EXIF UserComment (an 8-byte ``UNICODE\\0`` code, then UTF-16 big-endian: what A1111
writes through piexif and reads back), the JSON in an XMP packet as the property
``diffstudio:recipe`` (namespace ``urn:diffstudio:xmp:1.0/``). :func:`read_recipe` reads all three.

Recipe keys (see ``diffstudio.pipeline.generate.Recipe``): prompt, negative_prompt, steps,
sampler, scheduler, cfg_scale, seed, width, height, model, model_hash, strength (img2img
denoising strength), clip_skip, extra. A1111 fields with no diffstudio meaning are kept in
``extra["a1111"]`` so that reading and re-saving an A1111 image loses nothing.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffstudio.errors import CorruptFileError, InvalidInputError, UnsupportedFormatError
from diffstudio.io.atomic import atomic_path
from diffstudio.io.folders import existing_path
from diffstudio.io.images import ImageLike, load_image

# Our sampler names (k-diffusion's `sample_<name>`) -> A1111's display names.
SAMPLER_DISPLAY_NAMES = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "restart": "Restart",
    "ddim": "DDIM",
    "plms": "PLMS",
    "uni_pc": "UniPC",
    "lcm": "LCM",
}

# Our schedule names (ComfyUI's vocabulary) -> A1111's "Schedule type" display names.
SCHEDULER_DISPLAY_NAMES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}

_SAMPLER_FROM_DISPLAY = {v: k for k, v in SAMPLER_DISPLAY_NAMES.items()}
_SAMPLER_FROM_DISPLAY["Euler Ancestral"] = "euler_ancestral"
_SCHEDULER_FROM_DISPLAY = {v: k for k, v in SCHEDULER_DISPLAY_NAMES.items()} | {"SGMUniform": "sgm_uniform"}

# One "Key: value," item of the A1111 parameter line; a value is JSON-quoted or runs to the comma.
_PARAM_ITEM = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

PARAMETERS_CHUNK = "parameters"
RECIPE_CHUNK = "diffstudio"

# The formats an output may have, by suffix (Pillow's format names).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

_EXIF_IFD = 0x8769        # the pointer to the Exif sub-IFD
_USER_COMMENT = 0x9286    # Exif UserComment: an 8-byte character code, then the text
_UNICODE_CODE = b"UNICODE\0"
_JPEG_SEGMENT_LIMIT = 65_000  # an APP1 segment (EXIF, XMP) holds at most 65533 bytes with its header
_RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XMP_NAMESPACE = "urn:diffstudio:xmp:1.0/"  # JPEG / WebP: the recipe JSON is the XMP property diffstudio:recipe
_XMP_PROPERTY = "recipe"


def _quote(value: str) -> str:
    """A1111's rule: a value with ',', ':' or a newline is written as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _number(value: float | int) -> str:
    """7.0 -> '7', 7.5 -> '7.5', 0.75 -> '0.75' (as A1111 shows them)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def sampler_display_name(sampler: str) -> str:
    """'euler_ancestral' -> 'Euler a'; a name A1111 lacks is written as it is."""
    return SAMPLER_DISPLAY_NAMES.get(sampler, sampler)


def scheduler_display_name(scheduler: str) -> str:
    """'sgm_uniform' -> 'SGM Uniform'; a name A1111 lacks is written as it is."""
    return SCHEDULER_DISPLAY_NAMES.get(scheduler, scheduler)


def _as_dict(recipe: object) -> dict:
    if recipe is None:
        return {}
    if hasattr(recipe, "to_dict"):
        return dict(recipe.to_dict())
    if is_dataclass(recipe) and not isinstance(recipe, type):
        return asdict(recipe)
    if isinstance(recipe, Mapping):
        return dict(recipe)
    raise TypeError(f"a recipe must be a dict or a dataclass, not {type(recipe).__name__}")


def a1111_parameters(recipe: Mapping) -> str:
    """A recipe -> A1111's infotext: prompt, 'Negative prompt: ...' line, then 'Key: value, ...'."""
    items: list[tuple[str, str]] = []

    def add(key: str, value: object) -> None:
        if value is None or value == "":
            return
        items.append((key, _number(value) if isinstance(value, (int, float)) else _quote(str(value))))

    add("Steps", recipe.get("steps"))
    add("Sampler", sampler_display_name(recipe["sampler"]) if recipe.get("sampler") else None)
    add("Schedule type", scheduler_display_name(recipe["scheduler"]) if recipe.get("scheduler") else None)
    add("CFG scale", recipe.get("cfg_scale"))
    add("Seed", recipe.get("seed"))
    if recipe.get("width") and recipe.get("height"):
        items.append(("Size", f"{recipe['width']}x{recipe['height']}"))
    add("Model hash", recipe.get("model_hash"))
    add("Model", recipe.get("model"))
    add("Denoising strength", recipe.get("strength"))
    clip_skip = recipe.get("clip_skip")
    add("Clip skip", clip_skip if clip_skip and clip_skip > 1 else None)  # A1111 omits the default 1
    for key, value in ((recipe.get("extra") or {}).get("a1111") or {}).items():
        add(key, value)

    lines = [str(recipe.get("prompt", ""))]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in items))
    return "\n".join(lines)


def _split_sampler(display: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' (A1111 before 1.9 folded the schedule in) -> ('dpmpp_2m', 'karras')."""
    if display in _SAMPLER_FROM_DISPLAY:
        return _SAMPLER_FROM_DISPLAY[display], None
    for suffix in ("Karras", "Exponential"):
        base = display.removesuffix(f" {suffix}")
        if base != display and base in _SAMPLER_FROM_DISPLAY:
            return _SAMPLER_FROM_DISPLAY[base], suffix.lower()
    return display, None


def parse_a1111_parameters(text: str) -> dict:
    """A1111 infotext -> a recipe dict (the inverse of :func:`a1111_parameters`)."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_PARAM_ITEM.findall(lines[-1])) >= 3:
        fields = {key.strip(): _unquote(value) for key, value in _PARAM_ITEM.findall(lines.pop())}
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:") and not negative:
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    recipe: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}

    converters = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
                  "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int),
                  "Model": ("model", str), "Model hash": ("model_hash", str)}
    unmapped: dict[str, str] = {}
    for key, value in fields.items():
        try:
            if key in converters:
                name, convert = converters[key]
                recipe[name] = convert(value)
            elif key == "Size":
                width, height = value.lower().split("x")
                recipe["width"], recipe["height"] = int(width), int(height)
            elif key == "Sampler":
                recipe["sampler"], folded = _split_sampler(value)
                if folded and "Schedule type" not in fields:
                    recipe["scheduler"] = folded
            elif key == "Schedule type":
                recipe["scheduler"] = _SCHEDULER_FROM_DISPLAY.get(value, value.lower().replace(" ", "_"))
            else:
                unmapped[key] = value
        except ValueError:
            unmapped[key] = value  # keep what we cannot interpret rather than guess
    if unmapped:
        recipe["extra"] = {"a1111": unmapped}
    return recipe


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors and NumPy arrays/scalars
        return value.tolist()
    raise TypeError(f"a recipe value of type {type(value).__name__} cannot be stored as JSON")


def image_format(path: str | Path) -> str:
    """The format a file name asks for (Pillow's name): .png, .jpg / .jpeg or .webp; others are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        shown = f"'{suffix}'" if suffix else "no suffix"
        raise UnsupportedFormatError(f"cannot write {path}: the suffix chooses the image format and {shown} is "
                                     f"none of {' '.join(IMAGE_FORMATS)}; name the file e.g. out.png")
    return IMAGE_FORMATS[suffix]


def _user_comment(text: str) -> bytes:
    """EXIF UserComment as A1111 writes it (piexif's "unicode" encoding): an 8-byte code, then UTF-16 BE."""
    return _UNICODE_CODE + text.encode("utf-16-be")


def _read_user_comment(raw: bytes | str) -> str:
    """The inverse of :func:`_user_comment`, also for ASCII / undefined codes and little-endian UTF-16."""
    if isinstance(raw, str):
        return raw
    code, payload = raw[:8], raw[8:]
    if code == _UNICODE_CODE:
        # A1111 (piexif) always writes big-endian; writers that follow a little-endian EXIF header do not.
        little = len(payload) >= 2 and payload[1] == 0 and payload[0] != 0
        return payload.decode("utf-16-le" if little else "utf-16-be", errors="replace").rstrip("\0")
    return payload.decode("utf-8", errors="replace").rstrip("\0")


def _xmp_packet(recipe_json: str) -> bytes:
    """An XMP packet holding the recipe JSON in one ``diffstudio:recipe`` property."""
    return (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{_RDF_NS}">'
            f'<rdf:Description rdf:about="" xmlns:diffstudio="{XMP_NAMESPACE}">'
            f'<diffstudio:{_XMP_PROPERTY}>{escape(recipe_json)}</diffstudio:{_XMP_PROPERTY}>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def _recipe_from_xmp(xmp: bytes | str) -> str | None:
    try:
        root = ElementTree.fromstring(xmp)
    except ElementTree.ParseError:
        return None
    element = root.find(f".//{{{XMP_NAMESPACE}}}{_XMP_PROPERTY}")
    return element.text if element is not None else None


def _metadata_options(data: dict, image_format_name: str, path: Path) -> dict:
    """Pillow ``save`` options that store the recipe: PNG text chunks, or EXIF UserComment + XMP."""
    if not data:
        return {}
    parameters = a1111_parameters(data)
    recipe_json = json.dumps(data, default=_json_default)
    if image_format_name == "PNG":
        info = PngInfo()
        info.add_text(PARAMETERS_CHUNK, parameters)
        info.add_text(RECIPE_CHUNK, recipe_json)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(parameters)
    options = {"exif": exif.tobytes()}
    xmp = _xmp_packet(recipe_json)
    if image_format_name == "JPEG" and len(xmp) > _JPEG_SEGMENT_LIMIT:
        warnings.warn(f"{path}: the full recipe ({len(xmp)} bytes) does not fit a JPEG metadata segment; only "
                      "the A1111 parameters are stored (save as .png to keep it all)", stacklevel=3)
    else:
        options["xmp"] = xmp
    if image_format_name == "JPEG" and len(options["exif"]) > _JPEG_SEGMENT_LIMIT:
        raise InvalidInputError(f"{path}: the prompt is too long for a JPEG's EXIF segment (64 KB); save as .png")
    return options


def save_image(image: ImageLike, path: str | Path, recipe: Mapping | object | None = None, *,
               quality: int = 95) -> Path:
    """Write ``image`` in the format its suffix names (.png, .jpg/.jpeg, .webp) with its recipe.

    PNG: ``parameters`` (A1111) and ``diffstudio`` (JSON) text chunks. JPEG and WebP: the A1111
    text in EXIF UserComment (where A1111 writes and reads it) and the JSON in an XMP property.
    Without ``recipe``, the one the pipeline attached (``image.info["diffstudio_recipe"]``) is used.
    The file is written atomically (diffstudio/io/atomic.py); ``quality`` applies to JPEG and WebP.
    """
    return _save(image, path, recipe, image_format(path), quality)


def save_png(image: ImageLike, path: str | Path, recipe: Mapping | object | None = None) -> Path:
    """Write ``image`` as PNG whatever the suffix (see :func:`save_image`, which follows the suffix)."""
    return _save(image, path, recipe, "PNG", 95)


def _save(image: ImageLike, path: str | Path, recipe, image_format_name: str, quality: int) -> Path:
    if recipe is None and isinstance(image, Image.Image):
        recipe = image.info.get("diffstudio_recipe")
    path = Path(path)
    options = _metadata_options(_as_dict(recipe), image_format_name, path)
    if image_format_name != "PNG":
        options["quality"] = quality
    pixels = load_image(image)
    with atomic_path(path) as tmp:
        pixels.save(tmp, format=image_format_name, **options)
    return path


def _stored_texts(path: Path) -> tuple[str | None, str | None]:
    """(recipe JSON, A1111 parameters) as an image file stores them; None where absent."""
    try:
        with Image.open(path) as image:
            image.load()  # PNG text chunks after the pixel data are read by load()
            texts = dict(getattr(image, "text", None) or {})
            recipe_json = texts.get(RECIPE_CHUNK)
            parameters = texts.get(PARAMETERS_CHUNK, image.info.get(PARAMETERS_CHUNK))
            if recipe_json is None and image.info.get("xmp"):
                recipe_json = _recipe_from_xmp(image.info["xmp"])
            if parameters is None:
                comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                parameters = _read_user_comment(comment) if comment else None
    except OSError as err:
        raise CorruptFileError(f"{path}: cannot read the image ({err})") from None
    return recipe_json, (str(parameters) if parameters else None)


def read_recipe(path: str | Path) -> dict:
    """The recipe of a PNG, JPEG or WebP: diffstudio's JSON, else the A1111 parameters, parsed."""
    path = existing_path(path, "image")
    recipe_json, parameters = _stored_texts(path)
    if recipe_json is not None:
        try:
            recipe = json.loads(recipe_json)
            if isinstance(recipe, dict):
                return recipe
        except json.JSONDecodeError:
            pass
        if parameters is None:
            raise CorruptFileError(f"{path}: its diffstudio recipe is not valid JSON")
    if parameters is not None:
        return parse_a1111_parameters(parameters)
    raise UnsupportedFormatError(f"{path} holds no generation recipe (no '{RECIPE_CHUNK}' or "
                                 f"'{PARAMETERS_CHUNK}' text, no EXIF UserComment); it was not saved by "
                                 "diffstudio or A1111")
