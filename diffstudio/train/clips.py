"""Training data for motion modules: a folder of short video clips with captions.

A clip is a video file (``.mp4``, ``.gif``, ...) or a folder of frames (images in natural name order). Captions
come from ``metadata.csv`` (columns ``file_name,text``; ``file_name`` names a video file or a frames folder), else
from a ``.txt`` file beside each clip (``walk.mp4`` + ``walk.txt``, ``walk/`` + ``walk.txt``).
"""

from __future__ import annotations

from pathlib import Path

from diffstudio.errors import InvalidInputError
from diffstudio.video.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS


def _is_clip(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() in VIDEO_EXTENSIONS


def read_clips(folder: str | Path) -> list[tuple[Path, str]]:
    """[(clip path, caption)] of a data folder, in the order of metadata.csv or of the names; a clip's caption file
    is NAME.txt beside a video file or beside a folder of frames."""
    from diffstudio.train.data import read_captioned

    rows = read_captioned(folder, _is_clip, "clip",
                          f"video files ({', '.join(VIDEO_EXTENSIONS)}) and folders of frames",
                          lambda clip: clip.with_suffix(".txt") if clip.is_file() else clip.parent / f"{clip.name}.txt")
    not_clips = [str(p) for p, _ in rows if not _is_clip(p)]
    if not_clips:
        raise InvalidInputError(f"metadata.csv lists {len(not_clips)} entries that are neither a video "
                                f"({', '.join(VIDEO_EXTENSIONS)}) nor a folder of frames, e.g. {not_clips[0]}")
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
