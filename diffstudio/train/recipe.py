"""The recipe of a training run, and the check that a work folder's checkpoint belongs to it.

A recipe is everything that decides what a run learns: the data (a fingerprint of its images and captions),
the base model, and every setting of the trainer that changes an update. It is stored with each checkpoint
(``train.loop``), so the checkpoint and the recipe it was trained under are always replaced together.

A run resumes from its work folder only under the recipe of the checkpoint there. Otherwise it stops with a
``StaleRunError`` that lists each field that differs (old -> new) before anything is loaded into the model:
resuming under another recipe would mix two runs (the checkpoint's adapters, the new file's metadata).
The one change that may continue a run is the step count of a constant-rate schedule: there the rate at a step
does not depend on the total (``loop.schedule_depends_on_steps``), so the continued run equals one started with
the new total.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffstudio.errors import StaleRunError

RESTART = ("pass --restart (restart=True) to discard its checkpoint and start over from step 0, "
           "or use another --workdir")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def path_digest(path: Path) -> tuple[int, str]:
    """(bytes, SHA-256) of a file, or of a folder (a clip's frames): its files' relative names and digests, sorted."""
    if not path.is_dir():
        return path.stat().st_size, file_digest(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    entries = [(f.relative_to(path).as_posix(), file_digest(f)) for f in files]
    return sum(f.stat().st_size for f in files), hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def data_fingerprint(folder: str | Path, rows: list[tuple[Path, str]], what: str = "images") -> str:
    """'N images, sha256 XXXX' over each item's path relative to ``folder``, size, content hash and caption.

    The rows are hashed in the order they are read (the order of metadata.csv, or of the file names): the
    batches of step N are drawn by item index, so the order is part of what the run learns. Contents rather
    than modification times, so a copied data folder still resumes and a rewritten image does not. An item may
    be a folder (a video clip as frames): its files count.
    """
    entries = [(os.path.relpath(path, folder), *path_digest(Path(path)), caption) for path, caption in rows]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return f"{len(rows)} {what}, sha256 {digest}"


def model_fingerprint(path: str | Path | None) -> str:
    """'PATH (N bytes)' of a model file, or of a folder (the bytes of all its files)."""
    if path is None:
        return "the untrained demo model"
    path = Path(path).resolve()
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        size = path.stat().st_size if path.exists() else 0
    return f"{path} ({size} bytes)"


_MISSING = object()  # a field one of the two recipes does not have


def _show(value) -> str:
    return "(unset)" if value is _MISSING else value if isinstance(value, str) else json.dumps(value)


def check_resume(workdir: str | Path, recipe: dict, *, restart: bool) -> None:
    """Raise ``StaleRunError`` unless the checkpoint in ``workdir`` (if any) may be resumed under ``recipe``.

    With ``restart`` any checkpoint passes: the caller discards it once the new run is ready to start.
    """
    from diffstudio.train.loop import read_checkpoint, schedule_depends_on_steps

    saved = read_checkpoint(workdir)
    if saved is None or restart:
        return
    step, old = saved
    where = f"the work folder {workdir}"
    if old is None:
        raise StaleRunError(f"{where} holds a checkpoint (step {step}) that records no recipe, so whether it "
                            f"belongs to this run cannot be checked: {RESTART}")
    new = json.loads(json.dumps(recipe))  # the form it has once stored (tuples become lists)
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key, _MISSING) != new.get(key, _MISSING)]
    lines = "\n".join(f"  {key}: {_show(old.get(key, _MISSING))} -> {_show(new.get(key, _MISSING))}"
                      for key in changed)
    if changed == ["steps"]:
        if schedule_depends_on_steps(new.get("lr_end")):
            raise StaleRunError(f"{where} holds a run (at step {step}) with another step count:\n{lines}\n"
                                "Its learning rate falls along a half cosine to lr_end over all the steps, so "
                                "with another total every step would have had another rate and the run cannot "
                                f"be continued. Run again with steps={old['steps']} to finish it, or {RESTART}")
        if step > new["steps"]:
            raise StaleRunError(f"{where} holds a run already at step {step}, past the {new['steps']} steps "
                                f"asked for. Run again with steps={old['steps']} to finish it, or {RESTART}")
        return
    if changed:
        raise StaleRunError(f"{where} holds a run (at step {step}) made with another recipe:\n{lines}\n"
                            f"Run again with the old settings to resume it; to train the new ones, {RESTART}")
