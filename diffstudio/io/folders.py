"""Hugging Face / diffusers folders: model_index.json, component subfolders, shards and variants.

A diffusers pipeline folder has a ``model_index.json`` naming one subfolder per role (``unet``,
``vae``, ``text_encoder`` ...). Each component subfolder holds a ``config.json`` and its weights in
one of these layouts (all handled here, safetensors always preferred over pickled ``.bin``):

* one file: ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` / ``pytorch_model.bin``
* a variant: ``diffusion_pytorch_model.fp16.safetensors`` (the variant sits before the extension)
* shards: ``model.safetensors.index.json`` (or ``...index.fp16.json`` for a variant) whose
  ``weight_map`` names the shard files; likewise ``pytorch_model.bin.index.json``.

This module also holds :func:`existing_path`, the one place that turns a missing path into a
:class:`ModelNotFoundError` with a did-you-mean.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffstudio.errors import CorruptFileError, ModelNotFoundError, UnsupportedFormatError

# Weight file stems that transformers and diffusers write; only these take a ".<variant>" part.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_KINDS = ("safetensors", "bin")  # in order of preference: never unpickle when safetensors exist

_INDEX_NAME = re.compile(r"^(?P<stem>[^.]+)(?:\.(?P<v1>[^.]+))?\.(?P<kind>safetensors|bin)\.index"
                         r"(?:\.(?P<v2>[^.]+))?\.json$")
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")


def existing_path(path: str | Path, what: str = "model file") -> Path:
    """``path`` as a Path if it exists; else ModelNotFoundError naming near misses in its folder."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        raise ModelNotFoundError(f"{what} not found: {path} — the folder {path.parent} does not exist either "
                                 f"(the nearest existing folder is {parent}); check the path")
    try:
        neighbours = sorted(os.listdir(parent))
    except OSError:
        neighbours = []
    # Compare stems: a shared ".safetensors" would make every file in the folder look close.
    by_stem: dict[str, list[str]] = {}
    for name in neighbours:
        by_stem.setdefault(Path(name).stem.lower(), []).append(name)
    close_stems = difflib.get_close_matches(Path(path.name).stem.lower(), list(by_stem), n=3, cutoff=0.6)
    close = [name for stem in close_stems for name in by_stem[stem]][:3]
    folder = parent.resolve()
    if close:
        hint = f"Did you mean: {', '.join(close)}?"
    elif neighbours:
        more = f" and {len(neighbours) - 8} more" if len(neighbours) > 8 else ""
        hint = f"The folder {folder} holds: {', '.join(neighbours[:8])}{more}."
    else:
        hint = f"The folder {folder} is empty."
    raise ModelNotFoundError(f"{what} not found: {path}. {hint}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err}) — re-download it") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_index(folder: str | Path) -> dict:
    """``model_index.json`` -> ``{role: (library, class_name)}``.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are kept with their raw
    values; roles the pipeline leaves empty (``[null, null]``, e.g. no safety checker) are skipped.
    """
    folder = existing_path(folder, "model folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelNotFoundError(f"{folder} has no model_index.json, so it is not a diffusers pipeline "
                                 "folder; a single component folder (config.json + weights) reads with "
                                 "read_component")
    index = _read_json(index_path)
    out: dict = {}
    for key, value in index.items():
        if key.startswith("_"):
            out[key] = value
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            out[key] = (value[0], value[1])
    return out


@dataclass(frozen=True)
class _WeightFile:
    path: Path
    kind: str  # "safetensors" or "bin"
    variant: str | None
    is_index: bool
    known_stem: bool  # written by diffusers/transformers under a standard name


def _classify(path: Path) -> _WeightFile | None:
    name = path.name
    index = _INDEX_NAME.match(name)
    if index:
        return _WeightFile(path, index["kind"], index["v1"] or index["v2"], True, True)
    if _SHARD_NAME.search(name):
        return None  # shards are read through their index only
    for kind in WEIGHT_KINDS:
        if name.endswith(f".{kind}"):
            parts = name[: -len(kind) - 1].split(".")
            if parts[0] in WEIGHT_STEMS and len(parts) <= 2:
                return _WeightFile(path, kind, parts[1] if len(parts) == 2 else None, False, True)
            return _WeightFile(path, kind, None, False, False)
    return None


def _variant_order(requested: str | None, available: set[str | None]) -> list[str | None]:
    """The requested variant, then the plain files, then any other variant (fp16 before the rest)."""
    others = sorted((v for v in available if v not in (requested, None)), key=lambda v: (v != "fp16", v))
    return ([requested] if requested else []) + [None] + others


def _shards_of(index_path: Path) -> list[Path]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFileError(f"{index_path}: no 'weight_map' naming the shard files — re-download it")
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"{index_path.parent}: {index_path.name} names shard file(s) that are "
                                 f"missing: {', '.join(missing)} — download them into that folder")
    return shards


def component_files(subfolder: str | Path, variant: str | None = None) -> list[Path]:
    """The weight files of one component folder, in reading order (several only for shards).

    Safetensors beat ``.bin``; within a format, ``variant`` (e.g. ``"fp16"``) is preferred when
    present and the plain files are the fallback (and the other way round when no variant is asked).
    """
    folder = existing_path(subfolder, "model folder")
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is a file, not a component folder; read it with read_state_dict")
    files = [f for f in (_classify(p) for p in sorted(folder.iterdir()) if p.is_file()) if f is not None]
    for kind in WEIGHT_KINDS:
        standard = [f for f in files if f.kind == kind and f.known_stem]
        for wanted in _variant_order(variant, {f.variant for f in standard}):
            same = [f for f in standard if f.variant == wanted]
            indexes = [f for f in same if f.is_index]
            if indexes:
                return _shards_of(indexes[0].path)
            if same:
                return [min(same, key=lambda f: WEIGHT_STEMS.index(f.path.name.split(".")[0])).path]
        other = [f.path for f in files if f.kind == kind and not f.known_stem]
        if len(other) == 1:
            return other
        if other:
            names = ", ".join(p.name for p in other)
            raise UnsupportedFormatError(f"{folder} holds several .{kind} files and no index that says how "
                                         f"they belong together: {names}; pass the one you mean as a file "
                                         "path")
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise ModelNotFoundError(
        f"{folder} holds no model weights: looked for *.safetensors (diffusion_pytorch_model / model, with "
        f"an optional .<variant>), *.safetensors.index.json shards, and the same as .bin; found: {present}")


def read_component_config(subfolder: str | Path) -> dict | None:
    """The component's ``config.json`` as a dict, or None when there is none."""
    config_path = Path(subfolder) / "config.json"
    return _read_json(config_path) if config_path.is_file() else None


def read_component(subfolder: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None,
                   variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """One component folder -> ``(state_dict, config.json dict or None)``, shards merged."""
    # Imported here: the file readers use existing_path from this module.
    from diffstudio.io.pickle_checkpoint import load_pickle_checkpoint
    from diffstudio.io.safetensors_file import load_safetensors

    state_dict: dict[str, torch.Tensor] = {}
    for path in component_files(subfolder, variant):
        if path.name.endswith(".safetensors"):
            state_dict.update(load_safetensors(path, device, dtype))
        else:
            state_dict.update(load_pickle_checkpoint(path, device, dtype))
    return state_dict, read_component_config(subfolder)
