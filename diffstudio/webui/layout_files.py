"""Region layouts to and from files: the JSON of ``diffstudio generate --regions`` (pipeline/region_layout.py).

Saving writes a zip: ``layout.json`` plus one ``region-<n>.png`` mask per painted region (mask paths in the
JSON are relative to it, as the layout format wants), so ``unzip`` and ``diffstudio generate --regions
layout.json`` reproduce the painter's regions. Loading takes that zip, or a layout JSON uploaded together
with the mask files it names; boxes are drawn into the painter as masks of the canvas's size.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from diffstudio.errors import RegionError
from diffstudio.webui.form import RegionRow

LAYOUT_NAME = "layout.json"


@dataclass
class LoadedLayout:
    rows: list[RegionRow]
    global_weight: float | None


def layout_json(rows: list[RegionRow], global_weight: float | None) -> tuple[dict, dict[str, Image.Image]]:
    """(the layout JSON, {mask file name: mask}) of the painter's regions with a prompt."""
    regions, masks = [], {}
    for i, row in enumerate(r for r in rows if r.prompt.strip()):
        item: dict = {"prompt": row.prompt, "weight": float(row.weight)}
        if row.mask is not None:
            name = f"region-{i + 1}.png"
            masks[name] = row.mask.convert("L")
            item["mask"] = name
        if row.negative_prompt:
            item["negative_prompt"] = row.negative_prompt
        if row.feather:
            item["feather"] = float(row.feather)
        regions.append(item)
    if not regions:
        raise RegionError("no region has a prompt: write a prompt for each painted layer before saving")
    data = {"regions": regions}
    if global_weight is not None:
        data["global_weight"] = float(global_weight)
    return data, masks


def save_layout_zip(rows: list[RegionRow], global_weight: float | None, folder: str | Path) -> Path:
    """Write ``regions.zip`` (layout.json + masks) into ``folder``; returns its path."""
    data, masks = layout_json(rows, global_weight)
    path = Path(folder) / "regions.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(LAYOUT_NAME, json.dumps(data, indent=1))
        for name, mask in masks.items():
            with archive.open(name, "w") as f:
                mask.save(f, format="PNG")
    return path


def load_layout_files(paths: list[str | Path], canvas: tuple[int, int]) -> LoadedLayout:
    """A zip from :func:`save_layout_zip`, or a layout JSON and the mask images it names, -> the painter's rows
    (every region as a mask of ``canvas`` = (width, height)). Mistakes raise RegionError naming the file."""
    from diffstudio.pipeline.region_layout import load_layout

    paths = [Path(p) for p in paths]
    with tempfile.TemporaryDirectory(prefix="diffstudio-layout-") as scratch:
        folder = Path(scratch)
        zips = [p for p in paths if p.suffix.lower() == ".zip"]
        if zips:
            with zipfile.ZipFile(zips[0]) as archive:
                for member in archive.namelist():
                    name = Path(member).name  # flat: a member's folders (or '..') never leave the scratch folder
                    if name:
                        (folder / name).write_bytes(archive.read(member))
        else:
            for p in paths:
                (folder / (LAYOUT_NAME if p.suffix.lower() == ".json" else p.name)).write_bytes(p.read_bytes())
        if not (folder / LAYOUT_NAME).is_file():
            raise RegionError("no layout found: upload the regions .zip the painter saved, or a layout .json (with "
                              "the mask images it names)")
        layout = load_layout(folder / LAYOUT_NAME)
        rows = [RegionRow(r.prompt, r.weight, _mask_of(r, canvas), r.negative_prompt, r.feather)
                for r in layout.regions]
    return LoadedLayout(rows, layout.global_weight)


def _mask_of(region, canvas: tuple[int, int]) -> Image.Image:
    width, height = canvas
    if region.mask is not None:
        with Image.open(region.mask) as image:
            return image.convert("L").resize(canvas, Image.NEAREST)
    mask = Image.new("L", canvas, 0)
    x0, y0, x1, y1 = region.box if region.box is not None else (0, 0, 1, 1)
    ImageDraw.Draw(mask).rectangle([round(x0 * width), round(y0 * height), round(x1 * width) - 1,
                                    round(y1 * height) - 1], fill=255)
    return mask
