"""Diffutoon config files (JSON or YAML): read, check against the schema, and turn into ``toon_shade`` arguments.

The schema (docs/diffutoon.md, "Config file", has an example). Every section but ``input`` and ``pipeline.prompt``
is optional; an unknown key is an error (``ConfigError``), so a misspelt setting never silently falls back to a
default. Relative paths are read from the config file's folder.

    models:      model, vae, motion, embeddings (list), loras (list of {file, strength}), dtype, device
    input:       video, crop [left, top, right, bottom], start, end, width, height
    controlnets: lineart {model, scale, annotator}, tile {model, scale, annotator}
    smoother:    null | {preset: accurate|fast, steps} | {fastblend: {FastBlendSmoother fields}, steps}
    pipeline:    prompt, negative_prompt, steps, cfg_scale, clip_skip, strength, seed, context_length,
                 context_stride, vae_batch, tiled_vae
    edit:        prompt, negative_prompt, size, softedge {model, scale, annotator},
                 depth {model, scale, annotator | video}, steps, strength, cfg_scale, clip_skip,
                 context_length, context_stride, smoother (as above)
    output:      path, fps, work_dir

An ``annotator`` is a built-in name (lineart, softedge, canny, tile, blur), ``null`` (the frames as they are), or
``"package.module:function"``: a callable image -> image imported from an installed package (a learned detector
such as controlnet-aux's, wrapped in a function of yours).

Importing this module imports no torch; the command line reads and checks a config before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffstudio.errors import InvalidInputError

SECTIONS = {
    "models": {"model", "vae", "motion", "embeddings", "loras", "dtype", "device"},
    "input": {"video", "crop", "start", "end", "width", "height"},
    "controlnets": {"lineart", "tile"},
    "smoother": None,  # checked by _smoother
    "pipeline": {"prompt", "negative_prompt", "steps", "cfg_scale", "clip_skip", "strength", "seed",
                 "context_length", "context_stride", "vae_batch", "tiled_vae"},
    "edit": {"prompt", "negative_prompt", "size", "softedge", "depth", "steps", "strength", "cfg_scale",
             "clip_skip", "context_length", "context_stride", "smoother"},
    "output": {"path", "fps", "work_dir"},
}
UNIT_KEYS = {"model", "scale", "annotator"}
DEPTH_KEYS = UNIT_KEYS | {"video"}
SMOOTHER_KEYS = {"preset", "fastblend", "steps"}
# config key -> toon_shade keyword, per section
PIPELINE_ARGS = {"negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "cfg_scale",
                 "clip_skip": "clip_skip", "strength": "strength", "seed": "seed", "context_length": "context_length",
                 "context_stride": "context_stride", "vae_batch": "vae_batch", "tiled_vae": "tiled_vae"}
EDIT_ARGS = {"prompt": "edit_prompt", "negative_prompt": "edit_negative_prompt", "size": "edit_size",
             "steps": "edit_steps", "strength": "edit_strength", "cfg_scale": "edit_cfg_scale",
             "clip_skip": "edit_clip_skip", "context_length": "edit_context_length",
             "context_stride": "edit_context_stride"}


class ConfigError(InvalidInputError):
    """A Diffutoon config file that cannot be read or does not fit the schema; the message names the key."""


def read_config(path: str | Path) -> dict:
    """The parsed file (``.json``, ``.yaml``/``.yml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - a parse error of either format, reported with its position
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return data


def _keys(where: str, value, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping with keys among {', '.join(sorted(allowed))}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return value


def _path(base: Path, value):
    if value is None or not isinstance(value, str):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _annotator(where: str, value):
    """A built-in name, None, or 'package.module:function' imported here."""
    if value is None or value in ("lineart", "softedge", "canny", "tile", "blur"):
        return value
    if isinstance(value, str) and ":" in value:
        import importlib

        module, _, name = value.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{where}: cannot import the annotator {value!r} ({err})") from None
        if not callable(fn):
            raise ConfigError(f"{where}: {value!r} is not callable")
        return fn
    raise ConfigError(f"{where}: annotator {value!r} is not lineart, softedge, canny, tile, blur, null or "
                      "'package.module:function'")


def _smoother(where: str, value) -> tuple:
    """(smoother argument, steps) for toon_shade; None disables smoothing."""
    if value is None:
        return None, None
    value = _keys(where, value, SMOOTHER_KEYS)
    if ("preset" in value) == ("fastblend" in value):
        raise ConfigError(f"{where} takes either preset (accurate, fast) or fastblend {{...}}, not both or neither")
    steps = value.get("steps")
    if steps is not None and not (isinstance(steps, list) and all(isinstance(s, int) for s in steps)):
        raise ConfigError(f"{where}.steps must be a list of step numbers (-1: after decoding)")
    if "preset" in value:
        if value["preset"] not in ("accurate", "fast"):
            raise ConfigError(f"{where}.preset must be accurate or fast, got {value['preset']!r}")
        return value["preset"], steps
    from diffstudio.video.smoothing import FastBlendSmoother  # no torch at import (FastBlend's is lazy)

    try:
        return FastBlendSmoother(**_keys(f"{where}.fastblend", value["fastblend"],
                                         set(FastBlendSmoother.__dataclass_fields__) - {"device"})), steps
    except TypeError as err:
        raise ConfigError(f"{where}.fastblend: {err}") from None


def _unit(base: Path, where: str, value, keys=UNIT_KEYS) -> dict:
    value = _keys(where, value, keys)
    if value and "model" not in value:
        raise ConfigError(f"{where} needs model: the ControlNet file")
    return value


def resolve_config(data: dict, base: str | Path = ".") -> tuple[dict, dict, dict]:
    """(models section, toon_shade keyword arguments, output section) of a parsed config; paths made absolute."""
    base = Path(base)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    models = dict(_keys("models", data.get("models"), SECTIONS["models"]))
    for key in ("model", "vae", "motion"):
        models[key] = _path(base, models.get(key))
    models["embeddings"] = [_path(base, p) for p in models.get("embeddings") or []]
    models["loras"] = [dict(_keys("models.loras[]", lora, {"file", "strength"}), file=_path(base, lora.get("file")))
                       for lora in models.get("loras") or []]
    if not models["motion"]:
        raise ConfigError("models.motion is required: the AnimateDiff motion module file (e.g. mm_sd_v15_v2.ckpt)")

    source = _keys("input", data.get("input"), SECTIONS["input"])
    if not source.get("video"):
        raise ConfigError("input.video is required: a video file or a folder of frames")
    pipeline = _keys("pipeline", data.get("pipeline"), SECTIONS["pipeline"])
    if not isinstance(pipeline.get("prompt"), str):
        raise ConfigError("pipeline.prompt is required (a string)")
    args = {"video": _path(base, source["video"]), "prompt": pipeline["prompt"],
            "negative_embeddings": models["embeddings"]}
    for key in ("crop", "start", "end", "width", "height"):
        if source.get(key) is not None:
            args[key] = source[key]
    args.update({PIPELINE_ARGS[k]: v for k, v in pipeline.items() if k in PIPELINE_ARGS})

    controlnets = _keys("controlnets", data.get("controlnets"), SECTIONS["controlnets"])
    for name in ("lineart", "tile"):
        unit = _unit(base, f"controlnets.{name}", controlnets.get(name))
        if unit:
            args[f"{name}_controlnet"] = _path(base, unit["model"])
            if "scale" in unit:
                args[f"{name}_scale"] = float(unit["scale"])
            if "annotator" in unit:
                args[name] = _annotator(f"controlnets.{name}.annotator", unit["annotator"])
    if "smoother" in data:
        args["smoother"], args["smoother_steps"] = _smoother("smoother", data["smoother"])

    edit = _keys("edit", data.get("edit"), SECTIONS["edit"])
    if edit:
        if not isinstance(edit.get("prompt"), str):
            raise ConfigError("edit.prompt is required when there is an edit section (the editing branch's prompt)")
        args.update({EDIT_ARGS[k]: v for k, v in edit.items() if k in EDIT_ARGS})
        softedge = _unit(base, "edit.softedge", edit.get("softedge"))
        depth = _unit(base, "edit.depth", edit.get("depth"), DEPTH_KEYS)
        scales = [0.5, 0.5]
        if softedge:
            args["edit_softedge_controlnet"] = _path(base, softedge["model"])
            scales[0] = float(softedge.get("scale", 0.5))
            if "annotator" in softedge:
                args["edit_softedge"] = _annotator("edit.softedge.annotator", softedge["annotator"])
        if depth:
            args["edit_depth_controlnet"] = _path(base, depth["model"])
            scales[1] = float(depth.get("scale", 0.5))
            if "video" in depth and "annotator" in depth:
                raise ConfigError("edit.depth takes a video or an annotator, not both")
            if "video" in depth:
                args["edit_depth"] = _path(base, depth["video"])
            elif "annotator" in depth:
                args["edit_depth"] = _annotator("edit.depth.annotator", depth["annotator"])
        args["edit_scales"] = tuple(scales)
        if "smoother" in edit:
            args["edit_smoother"], _ = _smoother("edit.smoother", edit["smoother"])

    output = dict(_keys("output", data.get("output"), SECTIONS["output"]))
    output["path"] = _path(base, output.get("path") or "diffutoon.mp4")
    output["work_dir"] = _path(base, output.get("work_dir"))
    if output.get("fps") is not None:
        args["fps"] = float(output["fps"])
    args["output"], args["work_dir"] = output["path"], output["work_dir"]
    return models, args, output


def load_config(path: str | Path) -> tuple[dict, dict, dict]:
    """``resolve_config`` of a file, relative paths from its folder."""
    return resolve_config(read_config(path), Path(path).resolve().parent)
