"""FastBlend: model-free video deflickering and keyframe interpolation by guided patch matching.

Implemented from the description in "FastBlend: a Powerful Model-Free Toolkit Making Video
Stylization Easier" (Duan et al., 2023, arXiv 2311.09265), in plain torch: it runs on CPU or GPU,
streams frames through a sliding window (memory does not grow with the video's length), and a seed
fixes the result.

    from diffstudio.video.fastblend import blend, interpolate
    out = blend(style_frames, guide_frames, mode="fast")        # (N, H, W, 3) uint8
    out = interpolate({0: key0, 30: key30}, guide_frames)        # renders all guide frames

Frames are lists of PIL images or uint8 arrays (H, W, 3), or one (N, H, W, 3) uint8 array.
``iter_blend`` / ``iter_interpolate`` yield the output frames one by one instead (constant memory).
See docs/fastblend.md for the algorithm, the modes and their costs.

CPU threads: FastBlend sets no thread policy of its own, in the API or its commands. Choose the
thread count with ``torch.set_num_threads(n)`` or ``OMP_NUM_THREADS=n``. On a CPU shared with other
jobs, put ``OMP_WAIT_POLICY=PASSIVE`` in the environment before Python imports torch (setting
``os.environ`` later has no effect): with OpenMP's default spinning waits, two threads on a busy
2-core machine ran 10-100x slower than with passive waits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.video.fastblend.frames import DiskFrames, FrameCache, as_frames, frame_size, to_array
from diffstudio.video.fastblend.modes import blend_accurate, blend_balanced, blend_fast, interpolate_keyframes
from diffstudio.video.fastblend.patch_match import MatchConfig, PatchMatcher
from diffstudio.video.fastblend.remap import remap
from diffstudio.video.fastblend.remapper import PatchMatchRemapper, Remapper

MODES = ("fast", "balanced", "accurate")

__all__ = ["MODES", "DiskFrames", "MatchConfig", "PatchMatcher", "PatchMatchRemapper", "Remapper", "blend",
           "check_settings", "interpolate", "iter_blend", "iter_interpolate", "remap"]


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded."""
    return frame.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _stream(frames, total: int, desc: str, progress: bool) -> Iterator[np.ndarray]:
    for _, frame in tqdm(frames, total=total, desc=desc, disable=not progress):
        yield _to_uint8(frame)


def _remapper(minimum_patch_size: int, num_iter: int, guide_weight: float, tracking_window_size: int,
              seed: int, batch_size: int) -> PatchMatchRemapper:
    config = MatchConfig(patch_size=minimum_patch_size, num_iter=num_iter, guide_weight=guide_weight,
                         tracking_window_size=tracking_window_size)
    return PatchMatchRemapper(config, seed=seed, batch_size=batch_size)


def _device(device: str | torch.device | None) -> torch.device:
    """The torch device to compute on, checked by allocating on it (an unknown name, or CUDA on a
    machine without it, fails here rather than at the first frame)."""
    try:
        device = torch.device(device or "cpu")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError for a missing CUDA build
        raise InvalidInputError(f"cannot compute on device {str(device)!r} ({error}): use cpu, or a device "
                                "this machine has (e.g. cuda)") from error
    return device


def check_settings(*, mode: str = "fast", window_size: int = 15, batch_size: int = 8,
                   minimum_patch_size: int = 5, num_iter: int = 5, guide_weight: float = 10.0,
                   tracking_window_size: int = 0, device: str | torch.device | None = None) -> None:
    """Raise ``InvalidInputError`` for a setting ``blend`` / ``interpolate`` cannot take, without
    reading a frame: callers with slow inputs (the CLI decodes whole videos) check first."""
    if mode not in MODES:
        raise InvalidInputError(f"unknown FastBlend mode {mode!r}: choose one of {', '.join(MODES)}")
    if window_size < 0:
        raise InvalidInputError(f"window_size (frames on each side of the target) must be 0 or more, "
                                f"got {window_size}")
    _remapper(minimum_patch_size, num_iter, guide_weight, tracking_window_size, 0, batch_size)
    _device(device)


def iter_blend(style_frames, guide_frames, mode: str = "fast", window_size: int = 15, batch_size: int = 8,
               minimum_patch_size: int = 5, num_iter: int = 5, guide_weight: float = 10.0,
               tracking_window_size: int = 0, seed: int = 0, *, device: str | torch.device | None = None,
               progress: bool = False) -> Iterator[np.ndarray]:
    """Deflicker ``style_frames`` guided by the original video ``guide_frames``; yields uint8 frames.

    mode: "fast" (O(n log n) remaps), "balanced" (every pair in the window) or "accurate" (every
    pair, matched against the window's consensus). window_size: frames on each side of the target.
    batch_size: frame pairs matched at once (memory vs speed). minimum_patch_size: odd patch side.
    num_iter: search iterations per pyramid level. guide_weight: weight of the original video
    against the style in the patch distance. tracking_window_size: share matches between pairs up
    to this far apart on a track (0: off). seed: fixes the random search.
    """
    check_settings(mode=mode, window_size=window_size, batch_size=batch_size, minimum_patch_size=minimum_patch_size,
                   num_iter=num_iter, guide_weight=guide_weight, tracking_window_size=tracking_window_size,
                   device=device)
    styles, guides = as_frames(style_frames), as_frames(guide_frames)
    if len(styles) != len(guides):
        raise InvalidSizeError(f"{len(styles)} style frames but {len(guides)} guide frames: "
                               "give one stylised frame per frame of the original video")
    size = frame_size(guides, "guide video")
    if frame_size(styles, "style video") != size:
        h, w = frame_size(styles, "style video")
        raise InvalidSizeError(f"style frames are {w}x{h} but guide frames are {size[1]}x{size[0]}: "
                               "resize the stylised video to the original's size")
    device = _device(device)
    remapper = _remapper(minimum_patch_size, num_iter, guide_weight, tracking_window_size, seed, batch_size)
    style_cache = FrameCache(styles, size, device, "style")
    guide_cache = FrameCache(guides, size, device, "guide")
    if mode == "fast":
        frames = blend_fast(style_cache, guide_cache, remapper, window_size, batch_size)
    elif mode == "balanced":
        frames = blend_balanced(style_cache, guide_cache, remapper, window_size, batch_size)
    else:
        frames = blend_accurate(style_cache, guide_cache, remapper, window_size)
    return _stream(frames, len(styles), f"FastBlend ({mode})", progress)


def blend(style_frames, guide_frames, mode: str = "fast", window_size: int = 15, batch_size: int = 8,
          minimum_patch_size: int = 5, num_iter: int = 5, guide_weight: float = 10.0,
          tracking_window_size: int = 0, seed: int = 0, *, device: str | torch.device | None = None,
          progress: bool = False) -> np.ndarray:
    """Deflickered video as an (N, H, W, 3) uint8 array; arguments as ``iter_blend``."""
    frames = iter_blend(style_frames, guide_frames, mode, window_size, batch_size, minimum_patch_size,
                        num_iter, guide_weight, tracking_window_size, seed, device=device, progress=progress)
    return np.stack(list(frames))


def iter_interpolate(keyframes: Mapping[int, object], guide_frames, batch_size: int = 8,
                     minimum_patch_size: int = 5, num_iter: int = 5, guide_weight: float = 10.0,
                     tracking_window_size: int = 0, seed: int = 0, *, single_keyframe: bool = False,
                     device: str | torch.device | None = None,
                     progress: bool = False) -> Iterator[np.ndarray]:
    """Render every guide frame in the style of the keyframes ({frame index: stylised frame}).

    A frame between keyframes a < j < b mixes both, remapped to j, with weights (b - j) / (b - a)
    and (j - a) / (b - a); outside their span, or with ``single_keyframe``, the nearest keyframe
    alone renders it. Keyframes come out unchanged. Other arguments as ``iter_blend``.
    """
    check_settings(batch_size=batch_size, minimum_patch_size=minimum_patch_size, num_iter=num_iter,
                   guide_weight=guide_weight, tracking_window_size=tracking_window_size, device=device)
    guides = as_frames(guide_frames)
    size = frame_size(guides, "guide video")
    if not keyframes:
        raise InvalidSizeError("no keyframes given: interpolation needs at least one stylised frame")
    device = _device(device)
    keys: dict[int, torch.Tensor] = {}
    for index, frame in keyframes.items():
        index = int(index)
        if not 0 <= index < len(guides):
            raise InvalidSizeError(
                f"keyframe index {index} is outside the guide video's {len(guides)} frames (0-based)")
        array = to_array(frame)
        if array.shape[:2] != size:
            raise InvalidSizeError(
                f"keyframe {index} is {array.shape[1]}x{array.shape[0]} but guide frames are "
                f"{size[1]}x{size[0]}: resize the keyframes to the video's size")
        keys[index] = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(device)
    remapper = _remapper(minimum_patch_size, num_iter, guide_weight, tracking_window_size, seed, batch_size)
    frames = interpolate_keyframes(keys, FrameCache(guides, size, device, "guide"), remapper, batch_size,
                                   single_keyframe=single_keyframe)
    return _stream(frames, len(guides), "FastBlend (interpolate)", progress)


def interpolate(keyframes: Mapping[int, object], guide_frames, batch_size: int = 8,
                minimum_patch_size: int = 5, num_iter: int = 5, guide_weight: float = 10.0,
                tracking_window_size: int = 0, seed: int = 0, *, single_keyframe: bool = False,
                device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
    """Interpolated video as an (N, H, W, 3) uint8 array; arguments as ``iter_interpolate``."""
    frames = iter_interpolate(keyframes, guide_frames, batch_size, minimum_patch_size, num_iter, guide_weight,
                              tracking_window_size, seed, single_keyframe=single_keyframe, device=device,
                              progress=progress)
    return np.stack(list(frames))
