"""Frames in and out of a video run, a few at a time: the input video read once as a stream, frames <-> latents
through the VAE in small batches.

A video run keeps every frame's *latent* in host memory ((F, C, h, w): 64 KiB a frame at 512x512) and never
all of its pixels: ``InputVideo`` yields the input's frames one by one at the output size, ``LatentCodec``
encodes an iterable of frames batch by batch into latents and decodes latents into a stream of frames.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffstudio.errors import InvalidInputError

Frame = np.ndarray  # (H, W, 3) uint8


def frame_array(frame) -> Frame:
    """A frame as given (path, PIL image, array, tensor) -> (H, W, 3) uint8 RGB."""
    from diffstudio.io.images import load_image

    return np.asarray(load_image(frame))


class InputVideo:
    """An init video: a video file, a folder of frames, or a list of frames (paths, PIL images, arrays).

    ``size`` is the first frame's (width, height) (read on opening); ``frames(width, height, count)`` yields the
    first ``count`` frames resized to (width, height), reading the source once, and raises when it holds fewer.
    """

    def __init__(self, source, what: str = "input video"):
        self.source, self.what = source, what
        self._stream = self._open()
        try:
            self._first = next(self._stream)
        except StopIteration:
            raise InvalidInputError(f"the {what} has no frames") from None
        self.size = (self._first.shape[1], self._first.shape[0])

    def _open(self) -> Iterator[Frame]:
        from diffstudio.video.video_io import iter_frames

        if isinstance(self.source, (str, Path)):
            return iter_frames(str(self.source), self.what)
        if isinstance(self.source, (list, tuple)):
            return (frame_array(f) for f in self.source)
        raise InvalidInputError(f"the {self.what} must be a video file, a folder of frames or a list of frames, "
                                f"not a {type(self.source).__name__}")

    @property
    def fps(self) -> float | None:
        from diffstudio.video.video_io import video_fps

        if isinstance(self.source, (str, Path)) and os.path.isfile(self.source):
            return video_fps(str(self.source))
        return None

    def frames(self, width: int, height: int, count: int | None = None) -> Iterator[Frame]:
        """The frames at (width, height) (Lanczos), at most ``count`` of them (None: all)."""
        if self._stream is None:
            raise RuntimeError("InputVideo.frames() reads the source once; open it again to read it again")
        stream, self._stream = self._stream, None
        n = 0
        for frame in _chain(self._first, stream):
            if count is not None and n == count:
                return
            if (frame.shape[1], frame.shape[0]) != (width, height):
                frame = np.asarray(Image.fromarray(frame).resize((width, height), Image.LANCZOS))
            yield frame
            n += 1
        if count is not None and n < count:
            raise InvalidInputError(f"the {self.what} has {n} frames but {count} were asked for: ask for at most "
                                    f"{n} (or leave num_frames unset to render them all)")


def _chain(first, rest):
    yield first
    yield from rest


def fingerprint(source) -> str:
    """A content digest of an input: a file's bytes, a folder's image files, or in-memory frames."""
    h = hashlib.sha256()
    if isinstance(source, (str, Path)):
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(file.name.encode())
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    elif isinstance(source, (list, tuple)):
        for item in source:
            h.update(fingerprint(item).encode())
    else:
        h.update(np.ascontiguousarray(frame_array(source)).tobytes())
    return h.hexdigest()[:16]


class LatentCodec:
    """Frames <-> model latents through a pipeline's VAE, ``batch`` frames at a time."""

    def __init__(self, pipe, tiled: bool | None = None, batch: int = 8):
        if batch < 1:
            raise InvalidInputError(f"the VAE batch must be at least 1 frame, got {batch}")
        self.pipe, self.tiled, self.batch = pipe, tiled, batch

    def encode(self, frames: Iterable[Frame]) -> torch.Tensor:
        """(F, C, h, w) float32 latents on the CPU of a stream of (H, W, 3) uint8 frames."""
        chunks, pending = [], []
        for frame in frames:
            copy = np.array(frame, dtype=np.uint8)  # a copy: frames read from disk are read-only
            pending.append(torch.from_numpy(copy).permute(2, 0, 1))
            if len(pending) == self.batch:
                chunks.append(self._encode(pending))
                pending = []
        if pending:
            chunks.append(self._encode(pending))
        if not chunks:
            raise InvalidInputError("no frames to encode")
        return torch.cat(chunks)

    def _encode(self, frames: list[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack(frames).float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
        return self.pipe.encode_images(pixels, self.tiled).cpu()

    def decode(self, z: torch.Tensor) -> Iterator[Frame]:
        """The frames of latents (F, C, h, w), decoded ``batch`` at a time."""
        from diffstudio.io.images import tensor_to_images

        for start in range(0, z.shape[0], self.batch):
            for image in tensor_to_images(self.pipe.decode_latents(z[start:start + self.batch], self.tiled)):
                yield np.asarray(image)
