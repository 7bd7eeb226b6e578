"""``diffstudio batch recipes.jsonl -o outdir/``: render a list of recipes, resumable, split across processes.

Each line of the file is one JSON object: the fields of ``Request`` (``prompt`` required; ``negative_prompt``,
``width``, ``height``, ``steps``, ``cfg_scale``, ``seed``, ``sampler``, ``scheduler``, ``clip_skip``,
``guidance``, ``batch_size``, ``init_image``, ``strength``, ``mask``, ``regions`` ...), plus

- ``model``: the checkpoint (default: the command's ``--model``, else the embedded demo model),
- ``loras``: ``[[path, strength], ...]`` applied to that model for this line,
- ``name``: the output's file stem (default: the line number, ``00007``).

Relative paths (model, LoRAs, init image, mask, region layout) are read relative to the recipe file.
Line ``i`` is written to ``outdir/<name>.png`` (``<name>-<k>.png`` for a batch), with its recipe in the PNG
(A1111 ``parameters`` + diffstudio JSON) and the line itself under ``batch_line``. A line whose outputs all exist
with the same ``batch_line`` is skipped, so a killed batch started again continues; an output left by another
recipe raises :class:`StaleRunError` (``--restart`` renders over it). Every line is checked before any model loads.

Several processes: under ``accelerate launch`` or ``torchrun`` (``RANK``/``WORLD_SIZE`` set), process r renders
the lines i with ``i % WORLD_SIZE == r``; each loads a model once for all its lines that use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from diffstudio.errors import InvalidInputError, StaleRunError

_EXTRA_KEYS = {"model", "loras", "name"}
_PATH_KEYS = ("init_image", "mask")


@dataclass
class BatchLine:
    index: int
    text: dict  # the line as written: stored in each output so a restart can tell it apart
    request: dict  # Request keyword arguments, paths resolved
    model: str | None
    loras: tuple[tuple[str, float], ...]
    name: str

    def outputs(self, outdir: Path) -> list[Path]:
        count = int(self.request.get("batch_size", 1))
        if count == 1:
            return [outdir / f"{self.name}.png"]
        return [outdir / f"{self.name}-{k}.png" for k in range(count)]


def _resolve(base: Path, value):
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)
    return value


def _request_fields() -> set[str]:
    from diffstudio.pipeline.request import Request

    return {f.name for f in fields(Request)} - {"init_latent", "sigmas"}


def read_batch(path: str | Path, default_model: str | None = None) -> list[BatchLine]:
    """Parse and check every line of a recipe file (``InvalidInputError`` naming the line otherwise)."""
    from diffstudio.io.folders import existing_path

    path = existing_path(path, "recipe file")
    allowed = _request_fields()
    lines, names = [], set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            text = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(text, dict) or not isinstance(text.get("prompt"), str):
            raise InvalidInputError(f'{where}: each line is a JSON object with a "prompt" string')
        unknown = sorted(set(text) - allowed - _EXTRA_KEYS)
        if unknown:
            known = sorted(allowed | _EXTRA_KEYS)
            raise InvalidInputError(f"{where}: unknown field(s) {unknown}; a line takes {known}")
        request = {k: v for k, v in text.items() if k in allowed}
        for key in _PATH_KEYS:
            request[key] = _resolve(path.parent, request.get(key))
        if isinstance(request.get("regions"), str):
            from diffstudio.pipeline.region_layout import load_layout

            request["regions"] = load_layout(_resolve(path.parent, request["regions"]))
        loras = text.get("loras", [])
        if not (isinstance(loras, list) and all(isinstance(x, list) and len(x) == 2 for x in loras)):
            raise InvalidInputError(f'{where}: "loras" is a list of [path, strength] pairs')
        name = str(text.get("name", f"{len(lines):05d}"))
        if not name or "/" in name or "\\" in name or name.startswith(".") or name in names:
            raise InvalidInputError(f"{where}: the name {name!r} is empty, a path, hidden or used by another line")
        names.add(name)
        model = _resolve(path.parent, text.get("model")) or default_model
        lines.append(BatchLine(len(lines), text, request, model,
                               tuple((_resolve(path.parent, p), float(s)) for p, s in loras), name))
    if not lines:
        raise InvalidInputError(f"{path} holds no recipes (one JSON object per line)")
    return lines


def process_share(lines: list[BatchLine], rank: int | None = None, world: int | None = None) -> list[BatchLine]:
    """This process's lines: every ``world``-th from ``rank`` (``RANK``/``WORLD_SIZE`` from the launcher)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise InvalidInputError(f"process rank {rank} is outside a world of {world} processes")
    return [line for line in lines if line.index % world == rank]


def is_done(line: BatchLine, outdir: Path, restart: bool = False) -> bool:
    """True when every output of ``line`` exists and was made from this very line."""
    from diffstudio.errors import DiffstudioError
    from diffstudio.io.recipe import read_recipe

    outputs = line.outputs(outdir)
    made = [p for p in outputs if p.exists()]
    for output in made:
        try:
            stored = read_recipe(output).get("batch_line")
        except DiffstudioError:
            stored = None
        if stored != line.text and not restart:
            raise StaleRunError(f"{output} was made from another recipe than line {line.index + 1} of this file; "
                                "use another output folder, or --restart to render over it")
    return not restart and len(made) == len(outputs)


def run_batch(path: str | Path, outdir: str | Path, *, model: str | None = None, restart: bool = False,
              dtype=None, device: str = "cpu", progress: bool = True) -> list[Path]:
    """Render this process's share of ``path`` into ``outdir``; returns the files written now."""
    import diffstudio
    from diffstudio.io.recipe import save_png

    lines = process_share(read_batch(path, model))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    todo = [line for line in lines if not is_done(line, outdir, restart)]
    todo.sort(key=lambda line: (line.model or "", line.index))  # each model loads once
    written, loaded, base = [], None, None
    for line in tqdm(todo, desc="batch", disable=not progress):
        if loaded is None or loaded[0] != line.model:
            options = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
            base = diffstudio.load(*([line.model] if line.model else []), **options)
            loaded = (line.model, base)
        models = base.clone() if line.loras else base
        for lora, strength in line.loras:
            models.apply_lora(lora, strength)
        images = diffstudio.Pipeline(models)(progress=False, **line.request)
        for image, target in zip(images, line.outputs(outdir)):
            recipe = {**image.info["diffstudio_recipe"], "batch_line": line.text}
            written.append(save_png(image, target, recipe))
    return written
