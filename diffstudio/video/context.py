"""Sliding context windows over the frame axis (AnimateDiff on videos longer than its training clips).

A motion module is trained on clips of about 16 frames. A longer video is denoised window by
window: each window of `length` consecutive frames gets one network call, windows start every
`stride` frames, and each frame's prediction is the weighted mean of the predictions of every
window that holds it. The weights are a tent over the window (`tent_weights`), so a frame counts
most in the windows it sits in the middle of, and the seams between windows fade.

Window placement (`context_windows`): starts at 0, stride, 2*stride, ... while the window ends
inside the video; then one last window aligned to the end, ``[F - length, F)``. Every window is
therefore exactly `length` frames long (a motion module sees the clip length it was trained on;
DiffSynth-Studio instead cuts the last window short). A video of at most `length` frames is one
window of all its frames.

Dilated windows (``dilation`` d > 1, the "context stride" levels of AnimateDiff-Evolved's uniform
schedule): the frames are split into d interleaved sequences, frames j, j + d, j + 2d, ... for
j < d, and each sequence is laid out in windows as above, so one window spans d times as many
frames and a motion the module learned over `length` frames unfolds over ``d * length``.
``window_positions`` gives such a window sub-frame positions: time in units of the window's frame
spacing, the sequence j starting j/d of a step late, so the d interleaved windows render one motion
at shifted times rather than d unrelated ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffstudio.errors import InvalidInputError


def context_windows(num_frames: int, length: int = 16, stride: int = 8, dilation: int = 1) -> list[list[int]]:
    """Frame indices of each window (see the module docstring for the placement)."""
    if num_frames < 1 or length < 1 or stride < 1 or dilation < 1:
        raise InvalidInputError(f"context windows need num_frames, length, stride and dilation >= 1; got "
                                f"{num_frames}, {length}, {stride}, {dilation}")
    if stride > length:
        raise InvalidInputError(f"a context stride of {stride} frames with windows of {length} leaves frames "
                                "that no window covers; use stride <= length (half the length is usual)")
    if dilation > 1:
        sequences = [list(range(j, num_frames, dilation)) for j in range(min(dilation, num_frames))]
        return [[seq[i] for i in window] for seq in sequences
                for window in context_windows(len(seq), length, stride)]
    if num_frames <= length:
        return [list(range(num_frames))]
    starts = list(range(0, num_frames - length, stride))
    starts.append(num_frames - length)
    return [list(range(s, s + length)) for s in starts]


def window_positions(frames: Sequence[int], dilation: int = 1) -> torch.Tensor:
    """(len(frames),) float32 positions of a window's frames for the motion module: ``f / d`` shifted by a
    whole number so the first lies in [0, 1). Consecutive frames (d = 1) get 0, 1, 2, ...; the window
    j, j + d, ... of a dilated layout gets j/d, 1 + j/d, ... (sub-frame positions, module docstring)."""
    first = frames[0]
    return torch.tensor([(f - first + first % dilation) / dilation for f in frames], dtype=torch.float32)


def tent_weights(length: int) -> torch.Tensor:
    """(length,) float32 weights ``1 - |i - c| / (c + 1)`` with c = (length - 1) / 2: 1 at the centre,
    falling linearly to 1 / (c + 1) at both ends (never 0, so every frame of a window counts)."""
    centre = (length - 1) / 2
    i = torch.arange(length, dtype=torch.float32)
    return 1 - (i - centre).abs() / (centre + 1)


def windowed(fn: Callable[[torch.Tensor, Sequence[int]], torch.Tensor], x: torch.Tensor, length: int = 16,
             stride: int = 8, dim: int = 0, dilation: int = 1) -> torch.Tensor:
    """Run ``fn(x_window, frame_indices) -> prediction shaped like x_window`` on each context window of
    `x` along axis `dim` (the frame axis) and blend: each frame gets the tent-weighted mean of the
    predictions of the windows that hold it. ``frame_indices`` lets `fn` pick per-frame inputs
    (prompts, control images) for the window. Sums are kept in float32 (or x's dtype if wider) on
    x's device; `fn` may run elsewhere, its output is moved back.
    """
    num_frames = x.shape[dim]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    total = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    weight_sum = torch.zeros(num_frames, dtype=acc_dtype, device=x.device)
    view = [1] * x.ndim  # to broadcast per-frame weights along `dim`
    view[dim] = -1
    for frames in context_windows(num_frames, length, stride, dilation):
        index = torch.tensor(frames, device=x.device)
        window = x.index_select(dim, index)
        prediction = fn(window, frames)
        if prediction.shape != window.shape:
            raise InvalidInputError(f"the windowed function returned shape {tuple(prediction.shape)} for a window "
                                    f"of shape {tuple(window.shape)}; it must keep the shape")
        w = tent_weights(len(frames)).to(device=x.device, dtype=acc_dtype)
        total.index_add_(dim, index, prediction.to(device=x.device, dtype=acc_dtype) * w.view(view))
        weight_sum.index_add_(0, index, w)
    return (total / weight_sum.view(view)).to(x.dtype)
