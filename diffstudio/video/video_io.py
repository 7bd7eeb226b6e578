"""Reading and writing videos and folders of frames, one frame at a time.

Videos are decoded with imageio's PyAV plugin and encoded with PyAV (H.264, constant quality), so
neither side ever holds a whole video: ``iter_frames`` yields frames, ``VideoWriter`` takes them as
they come. A folder of images stands for a video wherever a path is expected: its images, in
natural order of their names (``2.png`` before ``10.png``), are the frames.

Writers never damage an existing output: they write beside it under a hidden name and rename into
place when done (``VideoWriter``). Missing inputs raise ``InputFileNotFoundError`` naming the input.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np

from diffstudio.errors import CorruptFileError, InputFileNotFoundError, InvalidInputError, UnsupportedFormatError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif")
WRITABLE_EXTENSIONS = (".mp4", ".mov", ".mkv", ".m4v")  # containers that take H.264
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = 30.0


@functools.cache
def _x264_determinism() -> dict[str, str]:
    """x264 options that make the same frames encode to the same bytes on this machine.

    x264's AVX-512 kernels (chosen on CPUs that have AVX-512) give a different stream from run to
    run for the same frames (measured with PyAV 18's libx264: 2-4 distinct outputs in 10 encodes of a
    9-frame 64x48 clip). Its AVX2 kernels are repeatable, and every AVX-512 CPU has AVX2, so there
    x264 is told to stop at AVX2; elsewhere its own CPU detection stands.
    """
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if "avx512f" in flags and "avx2" in flags else {}


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str, what: str = "folder of frames") -> list[str]:
    """The image files of a folder, in natural order of their names (``what`` names it in errors)."""
    if not os.path.isdir(folder):
        raise InputFileNotFoundError(f"no {what} at {folder!r}: check the path")
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise UnsupportedFormatError(f"the {what} {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def read_image(path: str) -> np.ndarray:
    """One image file as an (H, W, 3) uint8 RGB array."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise CorruptFileError(f"cannot read image {path!r}: {error}") from error


def check_source(path: str, what: str = "video") -> None:
    """Raise unless ``path`` is a video file or a folder holding images; ``what`` ("guide video",
    "style video") names the input in the message. Reads no frames."""
    if os.path.isdir(path):
        list_frame_files(path, f"{what} (a folder of frames)")
        return
    if not os.path.exists(path):
        raise InputFileNotFoundError(f"no {what} at {path!r}: give a video file or a folder of frames")
    if not path.lower().endswith(VIDEO_EXTENSIONS):
        raise UnsupportedFormatError(
            f"the {what} {path!r} is not a video ({', '.join(VIDEO_EXTENSIONS)}) or a folder of frames")


def iter_frames(path: str, what: str = "video") -> Iterator[np.ndarray]:
    """The frames of a video file or a folder of images, as (H, W, 3) uint8 arrays, in order."""
    check_source(path, what)
    if os.path.isdir(path):
        for name in list_frame_files(path, what):
            yield read_image(name)
        return
    import imageio.v3 as iio

    try:
        for frame in iio.imiter(path, plugin="pyav"):
            yield np.ascontiguousarray(frame[:, :, :3])
    except (OSError, ValueError) as error:
        raise CorruptFileError(f"cannot decode the {what} {path!r}: {error}") from error


def read_frames(path: str) -> list[np.ndarray]:
    """All frames of a video or folder in memory (for short clips; else use ``iter_frames``)."""
    return list(iter_frames(path))


def video_fps(path: str, default: float = DEFAULT_FPS) -> float:
    """Frames per second of a video file; ``default`` for a folder or a file that does not say."""
    if os.path.isdir(path) or not os.path.exists(path):
        return default
    import imageio.v3 as iio

    try:
        fps = iio.immeta(path, plugin="pyav").get("fps")
    except (OSError, ValueError):
        return default
    return float(fps) if fps else default


KEYFRAME_NAMES = "the frame number (0-based) as the last digits of the name, e.g. 00042.png or key_42.png"


def frame_index(path: str) -> int:
    """The frame number in a keyframe's file name: its last run of digits (``key_0042.png`` -> 42)."""
    digits = re.findall(r"\d+", os.path.splitext(os.path.basename(path))[0])
    if not digits:
        raise InvalidInputError(f"keyframe file {path!r} has no frame number in its name: name each keyframe "
                                f"by the frame it stylises, {KEYFRAME_NAMES}")
    return int(digits[-1])


def read_indexed_frames(folder: str, what: str = "keyframe folder") -> dict[int, np.ndarray]:
    """Keyframes from a folder: {frame number from the file name: (H, W, 3) uint8 image}.

    Every name is checked before any image is read."""
    paths = list_frame_files(folder, what)
    indices: dict[int, str] = {}
    for path in paths:
        index = frame_index(path)
        if index in indices:
            raise InvalidInputError(f"{os.path.basename(indices[index])!r} and {os.path.basename(path)!r} in "
                                    f"{folder!r} both name frame {index}: keep one keyframe per frame")
        indices[index] = path
    return {index: read_image(path) for index, path in indices.items()}


def _hidden_sibling(path: str, tag: str, suffix: str = "") -> str:
    """A name beside ``path`` that does not exist yet: ``.NAME.TAG-RANDOM`` + ``suffix``."""
    folder, name = os.path.split(path)
    while True:
        candidate = os.path.join(folder, f".{name}.{tag}-{secrets.token_hex(4)}{suffix}")
        if not os.path.lexists(candidate):
            return candidate


def check_output(path: str) -> None:
    """Raise before any work if ``path`` cannot be written as a video file or a PNG frame folder.

    A folder output replaces an existing folder only when that folder holds nothing but images, so
    a mistyped path never deletes unrelated files.
    """
    is_video = path.lower().endswith(VIDEO_EXTENSIONS)
    if is_video and not path.lower().endswith(WRITABLE_EXTENSIONS):
        raise UnsupportedFormatError(
            f"cannot write {path!r}: write {', '.join(WRITABLE_EXTENSIONS)} or a folder for PNG frames")
    target = os.path.realpath(path)
    if is_video and os.path.isdir(target):
        raise InvalidInputError(f"the output {path!r} is a folder: give a video file name, or a folder "
                                "name without a video extension for PNG frames")
    if not is_video and os.path.lexists(target):
        if not os.path.isdir(target):
            raise InvalidInputError(f"the output {path!r} is a file, not a folder: give a new folder name for "
                                    f"PNG frames, or a video name ({', '.join(WRITABLE_EXTENSIONS)})")
        others = sorted(n for n in os.listdir(target)
                        if not (n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(target, n))))
        if others:
            raise InvalidInputError(
                f"the output folder {path!r} holds more than frames ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}) and would be replaced: give a new or empty folder")


class VideoWriter:
    """Writes frames one at a time to a video file (H.264 in .mp4/.mov/.mkv/.m4v) or, for a path
    without a video extension, to a folder of numbered PNGs (00000.png, ...).

    Nothing at ``path`` changes until the last frame is in: frames go to a hidden file (or folder)
    beside it, ``.NAME.partial-RANDOM``, which ``close()`` renames over ``path`` (a folder replaces
    the old folder whole, so no stale frames remain). ``abort()`` deletes it instead; used as a
    context manager, the writer aborts when the block raises. A killed process can leave the hidden
    file behind, never a damaged output. Files get the usual mode (0666 less the umask).

    ``crf``: x264 constant quality (0 lossless, 17 visually lossless, 23 default). Odd frame sizes
    are encoded in 4:4:4 chroma, since 4:2:0 needs even sides.
    """

    def __init__(self, path: str, fps: float = DEFAULT_FPS, crf: int = 17):
        check_output(path)
        if not fps > 0:
            raise InvalidInputError(f"the frame rate must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise InvalidInputError(f"crf must be 0-51 (0 lossless, 17 visually lossless), got {crf}")
        self.path, self.fps, self.crf = path, fps, crf
        self.target = os.path.realpath(path)  # through a link: the link stays, its target is replaced
        self.count = 0
        self.is_video = path.lower().endswith(VIDEO_EXTENSIONS)
        self._partial: str | None = None  # made at the first frame
        self._container = self._stream = None

    def write(self, frame) -> None:
        array = np.ascontiguousarray(np.asarray(frame)[:, :, :3], dtype=np.uint8)
        if self._partial is None:
            self._begin(array.shape[0], array.shape[1])
        if not self.is_video:
            from PIL import Image

            Image.fromarray(array).save(os.path.join(self._partial, f"{self.count:05d}.png"))
        else:
            import av

            for packet in self._stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                self._container.mux(packet)
        self.count += 1

    def _begin(self, height: int, width: int) -> None:
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        if not self.is_video:
            self._partial = _hidden_sibling(self.target, "partial")
            os.mkdir(self._partial, 0o777)  # the umask applies, as for any new folder
            return
        import av

        # Reserve the name with the usual mode (O_EXCL: never another's file); PyAV then writes it.
        self._partial = _hidden_sibling(self.target, "partial", os.path.splitext(self.target)[1])
        os.close(os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self._container = av.open(self._partial, "w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        self._stream.options = {"crf": str(self.crf), **_x264_determinism()}

    def close(self) -> None:
        """Finish the output and put it in place of ``path``."""
        if self._partial is None:
            raise InvalidInputError(f"no frames were written, so {self.path!r} was left as it was")
        try:
            if self._container is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._container.close()
                self._container = self._stream = None
            if self.is_video:
                os.replace(self._partial, self.target)
            else:
                _swap_in_folder(self._partial, self.target)
        except BaseException:
            self.abort()
            raise
        self._partial = None

    def abort(self) -> None:
        """Drop what was written; ``path`` stays as it was."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the partial file is deleted anyway
                pass
            self._container = self._stream = None
        if self._partial is not None:
            if os.path.isdir(self._partial):
                shutil.rmtree(self._partial, ignore_errors=True)
            elif os.path.lexists(self._partial):
                os.unlink(self._partial)
            self._partial = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _swap_in_folder(new: str, target: str) -> None:
    """Put folder ``new`` at ``target``, replacing an old folder there, which is then deleted.

    Two renames: old -> hidden name, new -> target (the old one is put back if that fails).
    """
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    old = _hidden_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)


def write_frames(path: str, frames: Iterable, fps: float = DEFAULT_FPS, crf: int = 17) -> int:
    """Write frames (arrays or PIL images) to a video file or folder; returns how many."""
    with VideoWriter(path, fps, crf) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.count
