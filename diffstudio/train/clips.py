"""Training data for motion modules: a folder of short video clips with captions.

A clip is a video file (``.mp4``, ``.gif``, ...) or a folder of frames (images in natural name order). Captions
come from ``metadata.csv`` (columns ``file_name,text``; ``file_name`` names a video file or a frames folder), else
from a ``.txt`` file beside each clip (``walk.mp4`` + ``walk.txt``, ``walk/`` + ``walk.txt``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from diffstudio.errors import InvalidInputError, ModelNotFoundError
from diffstudio.video.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS


def _is_clip(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() in VIDEO_EXTENSIONS


def read_clips(folder: str | Path) -> list[tuple[Path, str]]:
    """[(clip path, caption)] of a data folder, in the order of metadata.csv or of the names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"training data folder {folder} does not exist")
    meta = folder / "metadata.csv"
    if meta.exists():
        with meta.open(newline="", encoding="utf-8") as f:
            rows = [(folder / r["file_name"], r["text"]) for r in csv.DictReader(f)]
        missing = [str(p) for p, _ in rows if not p.exists()]
        if missing:
            raise ModelNotFoundError(f"{len(missing)} clips listed in {meta} are missing, e.g. {missing[0]}")
        not_clips = [str(p) for p, _ in rows if not _is_clip(p)]
        if not_clips:
            raise InvalidInputError(f"{meta} lists {len(not_clips)} entries that are neither a video "
                                    f"({', '.join(VIDEO_EXTENSIONS)}) nor a folder of frames, e.g. {not_clips[0]}")
    else:
        rows = []
        for clip in sorted(p for p in folder.iterdir() if _is_clip(p)):
            txt = clip.with_suffix(".txt") if clip.is_file() else clip.parent / (clip.name + ".txt")
            rows.append((clip, txt.read_text(encoding="utf-8").strip() if txt.exists() else ""))
    if not rows:
        raise ModelNotFoundError(f"{folder} has no clips (looked for metadata.csv, video files "
                                 f"({', '.join(VIDEO_EXTENSIONS)}) and folders of frames)")
    return rows


def read_clip_frames(path: Path, size: tuple[int, int], limit: int | None = None):
    """The clip's frames (at most ``limit``) as PIL images of ``size`` (width, height): resized to cover, centre
    cropped."""
    from PIL import Image, ImageOps

    from diffstudio.video.video_io import iter_frames

    frames = []
    for frame in iter_frames(str(path), "training clip"):
        frames.append(ImageOps.fit(Image.fromarray(frame), size, Image.LANCZOS))
        if limit is not None and len(frames) >= limit:
            break
    return frames
