"""Region layout files (``diffstudio generate --regions layout.json``).

    {"global_weight": 0.2,                       (optional)
     "regions": [
        {"prompt": "a red circle", "box": [0, 0, 0.5, 1], "weight": 1.0, "negative_prompt": "blurry"},
        {"prompt": "a blue square", "mask": "right.png", "feather": 0.05}
     ]}

Boxes are fractions of the image (x0, y0, x1, y1), (0, 0) = top-left; mask paths are relative to
the layout file. Every mistake is a RegionError naming the file and the entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffstudio.errors import RegionError
from diffstudio.io.folders import existing_path
from diffstudio.pipeline.regions import Region, RegionLayout

TOP_KEYS = ("regions", "global_weight")
REGION_KEYS = ("prompt", "box", "mask", "weight", "negative_prompt", "feather")


def _unknown(keys, known, where: str) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise RegionError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(known)}")


def parse_layout(data, base: Path, name: str = "layout") -> RegionLayout:
    """A parsed JSON layout -> RegionLayout; relative mask paths are resolved against ``base``."""
    if not isinstance(data, dict):
        raise RegionError(f"{name}: the layout must be a JSON object with a 'regions' list")
    _unknown(data, TOP_KEYS, name)
    entries = data.get("regions")
    if not isinstance(entries, list) or not entries:
        raise RegionError(f"{name}: 'regions' must be a non-empty list of region objects")
    regions = []
    for i, entry in enumerate(entries):
        where = f"{name} regions[{i}]"
        if not isinstance(entry, dict):
            raise RegionError(f"{where}: a region is an object like {{\"prompt\": ..., \"box\": [x0, y0, x1, y1]}}")
        _unknown(entry, REGION_KEYS, where)
        if not isinstance(entry.get("prompt"), str):
            raise RegionError(f"{where}: needs a 'prompt' string")
        item = dict(entry)
        if "mask" in item:
            if not isinstance(item["mask"], str):
                raise RegionError(f"{where}: 'mask' is a path to an image file (relative to the layout file)")
            path = Path(item["mask"]).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise RegionError(f"{where}: mask file not found: {path}")
            item["mask"] = str(path)
        try:
            regions.append(Region(**item))
        except RegionError as err:
            raise RegionError(f"{where}: {err}") from None
    try:
        return RegionLayout(regions, **({"global_weight": data["global_weight"]} if "global_weight" in data else {}))
    except RegionError as err:
        raise RegionError(f"{name}: {err}") from None


def load_layout(path: str | Path) -> RegionLayout:
    """Read and check a layout file (see the module docstring)."""
    path = existing_path(path, "region layout file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RegionError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise RegionError(f"{path}: not a UTF-8 text file; a layout is JSON") from None
    return parse_layout(data, path.parent, str(path))
