"""The generation recipe stored in PNG files, readable by diffstudio and by the A1111 ecosystem.

Each PNG gets two text chunks:

* ``parameters`` — AUTOMATIC1111's "infotext", which image sites and other UIs parse::

      a red circle
      Negative prompt: blurry
      Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

  Values holding ``,`` ``:`` or a newline are JSON-quoted, as A1111 does.
* ``diffstudio`` — the full recipe as JSON (sigmas, family, batch index ...), the source of truth.

Recipe keys (see ``diffstudio.pipeline.generate.Recipe``): prompt, negative_prompt, steps,
sampler, scheduler, cfg_scale, seed, width, height, model, model_hash, strength (img2img
denoising strength), clip_skip, extra. A1111 fields with no diffstudio meaning are kept in
``extra["a1111"]`` so that reading and re-saving an A1111 image loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffstudio.errors import CorruptFileError, UnsupportedFormatError
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


def save_png(image: ImageLike, path: str | Path, recipe: Mapping | object | None = None) -> Path:
    """Write ``image`` as PNG with its recipe in a ``parameters`` (A1111) and a ``diffstudio`` chunk.

    Without ``recipe``, the one the pipeline attached (``image.info["diffstudio_recipe"]``) is
    used. The file is written atomically (temporary file, then rename).
    """
    if recipe is None and isinstance(image, Image.Image):
        recipe = image.info.get("diffstudio_recipe")
    data = _as_dict(recipe)
    info = PngInfo()
    if data:
        info.add_text(PARAMETERS_CHUNK, a1111_parameters(data))
        info.add_text(RECIPE_CHUNK, json.dumps(data, default=_json_default))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        load_image(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_recipe(path: str | Path) -> dict:
    """The recipe of a PNG: the ``diffstudio`` JSON chunk, else a parsed A1111 ``parameters`` chunk."""
    path = existing_path(path, "image")
    try:
        with Image.open(path) as image:
            image.load()
            chunks = dict(getattr(image, "text", None) or image.info)
    except OSError as err:
        raise CorruptFileError(f"{path}: cannot read the image ({err})") from None
    if RECIPE_CHUNK in chunks:
        try:
            recipe = json.loads(chunks[RECIPE_CHUNK])
            if isinstance(recipe, dict):
                return recipe
        except json.JSONDecodeError:
            pass
        if PARAMETERS_CHUNK not in chunks:
            raise CorruptFileError(f"{path}: its diffstudio recipe chunk is not valid JSON")
    if PARAMETERS_CHUNK in chunks:
        return parse_a1111_parameters(str(chunks[PARAMETERS_CHUNK]))
    raise UnsupportedFormatError(f"{path} holds no generation recipe (no '{RECIPE_CHUNK}' or "
                                 f"'{PARAMETERS_CHUNK}' text chunk); it was not saved by diffstudio or A1111")
