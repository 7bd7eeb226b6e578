"""Frame sequences for FastBlend: in memory or spilled to disk, read one frame at a time.

The blending modes only ever need the frames of one sliding window, so they read frames through
``FrameCache``, which keeps the window's frames as uint8 tensors on the compute device and drops
the rest. A whole video never has to be in memory: ``DiskFrames`` keeps decoded frames in one raw
file and reads each with a single ``os.pread``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from diffstudio.errors import InvalidSizeError


def to_array(frame) -> np.ndarray:
    """A PIL image or an (H, W, 3) / (H, W) array -> contiguous (H, W, 3) uint8 array."""
    if hasattr(frame, "convert"):  # PIL image
        frame = np.asarray(frame.convert("RGB"))
    array = np.asarray(frame)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InvalidSizeError(f"a frame must be (H, W, 3) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise InvalidSizeError(f"frames must be uint8 (0-255), got {array.dtype}: use astype(np.uint8)")
    array = np.ascontiguousarray(array[:, :, :3])
    return array if array.flags.writeable else array.copy()  # torch.from_numpy wants writable memory


class ArrayFrames:
    """A list of PIL images / uint8 arrays, or one (N, H, W, 3) uint8 array, as a frame sequence."""

    def __init__(self, frames: Sequence | np.ndarray):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return to_array(self.frames[index])


class DiskFrames:
    """Frames of one size kept in a raw uint8 file; each read is one ``os.pread`` of one frame.

    Build with ``DiskFrames.spill(frames, directory)``; ``close()`` (or ``with``) deletes the file.
    """

    def __init__(self, path: str, count: int, height: int, width: int):
        self.path, self.count, self.height, self.width = path, count, height, width
        self.frame_bytes = height * width * 3
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    @classmethod
    def spill(cls, frames: Iterable, directory: str | None = None) -> DiskFrames:
        """Write every frame of an iterable (PIL images or arrays) to a temporary raw file."""
        handle, path = tempfile.mkstemp(suffix=".rgb", dir=directory)
        count, size = 0, None
        with os.fdopen(handle, "wb") as out:
            for frame in frames:
                array = to_array(frame)
                if size is None:
                    size = array.shape[:2]
                elif array.shape[:2] != size:
                    os.unlink(path)
                    raise InvalidSizeError(
                        f"frame {count} is {array.shape[1]}x{array.shape[0]}, the first was "
                        f"{size[1]}x{size[0]}: all frames of a video must have one size")
                out.write(array.tobytes())
                count += 1
        if size is None:
            os.unlink(path)
            raise InvalidSizeError("no frames were read")
        return cls(path, count, size[0], size[1])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.count:
            raise IndexError(index)
        data = os.pread(self._fd, self.frame_bytes, index * self.frame_bytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.height, self.width, 3)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            os.unlink(self.path)

    def __enter__(self) -> DiskFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_frames(frames) -> Sequence:
    """Accept a frame sequence as the API does: list of PIL/arrays, an (N, H, W, 3) array, or any
    object with ``__len__`` and ``__getitem__`` returning frames (such as ``DiskFrames``)."""
    if isinstance(frames, (DiskFrames, ArrayFrames)):
        return frames
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise InvalidSizeError(f"a video array must be (N, H, W, 3), got shape {frames.shape}")
        return ArrayFrames(frames)
    if hasattr(frames, "__len__") and hasattr(frames, "__getitem__"):
        return ArrayFrames(frames)
    raise TypeError(f"frames must be a list of images or an (N, H, W, 3) array, got {type(frames).__name__}")


def frame_size(frames: Sequence, what: str) -> tuple[int, int]:
    """(height, width) of the first frame; raises InvalidSizeError for an empty sequence."""
    if len(frames) == 0:
        raise InvalidSizeError(f"the {what} has no frames")
    first = frames[0]
    return first.shape[0], first.shape[1]


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [0, 1]; float images pass through (as float32)."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


class FrameCache:
    """Frames of a sequence as (3, H, W) uint8 tensors on the compute device, for one window.

    ``keep(start, stop)`` drops every cached frame outside [start, stop); frames are read on first
    use. ``stack(indices)`` batches frames as (B, 3, H, W) uint8, ``floats`` as floats in [0, 1].
    """

    def __init__(self, frames: Sequence, size: tuple[int, int], device: torch.device, what: str):
        self.frames, self.size, self.device, self.what = frames, size, device, what
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def get(self, index: int) -> torch.Tensor:
        tensor = self._cache.get(index)
        if tensor is None:
            array = self.frames[index]
            if array.shape[:2] != self.size:
                raise InvalidSizeError(
                    f"{self.what} frame {index} is {array.shape[1]}x{array.shape[0]}, expected "
                    f"{self.size[1]}x{self.size[0]}: every guide and style frame must have the same size")
            if not array.flags.writeable:  # e.g. read from disk with np.frombuffer
                array = array.copy()
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
            tensor = tensor.to(self.device)
            self._cache[index] = tensor
        return tensor

    def stack(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames as one (B, 3, H, W) uint8 batch."""
        return torch.stack([self.get(i) for i in indices])

    def floats(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames as one (B, 3, H, W) float batch in [0, 1]."""
        return as_unit_float(self.stack(indices))

    def keep(self, start: int, stop: int) -> None:
        for index in [i for i in self._cache if not start <= i < stop]:
            del self._cache[index]
