"""Sliding context windows over the frame axis: placement, tent weights, and the blend they give."""

from __future__ import annotations

import pytest
import torch

from diffstudio.errors import InvalidInputError
from diffstudio.video.context import context_windows, tent_weights, window_positions, windowed

GRID = [(f, n, s) for f in (1, 2, 5, 8, 16, 17, 24, 33) for n in (1, 4, 8, 16) for s in (1, 3, 4, 8) if s <= n]


@pytest.mark.parametrize("frames,length,stride", GRID)
def test_windows_cover_every_frame_in_order_with_full_length(frames, length, stride):
    windows = context_windows(frames, length, stride)
    covered = sorted({i for w in windows for i in w})
    assert covered == list(range(frames))
    for w in windows:
        assert w == list(range(w[0], w[0] + len(w)))  # consecutive frames
        assert len(w) == min(length, frames)  # every window is full length (the last one aligned to the end)
    starts = [w[0] for w in windows]
    assert starts == sorted(set(starts))  # no window twice
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gap wider than the stride
    assert windows[-1][-1] == frames - 1


def test_window_placement_examples():
    assert context_windows(1, 16, 8) == [[0]]
    assert context_windows(10, 16, 8) == [list(range(10))]  # fewer frames than a window: one window
    assert context_windows(16, 16, 8) == [list(range(16))]
    assert [w[0] for w in context_windows(32, 16, 8)] == [0, 8, 16]  # exact multiple: no extra window
    assert [w[0] for w in context_windows(20, 16, 8)] == [0, 4]  # remainder: the last window ends at frame 19


def test_bad_arguments_raise_named_errors():
    for args in [(0, 16, 8), (8, 0, 1), (8, 4, 0), (20, 4, 5), (20, 4, 2, 0)]:
        with pytest.raises(InvalidInputError):
            context_windows(*args)
    with pytest.raises(InvalidInputError, match="keep the shape"):
        windowed(lambda w, idx: w[:1], torch.zeros(20, 2), 8, 4)


def test_tent_weights_shape():
    assert tent_weights(1).tolist() == [1.0]
    for n in (2, 3, 7, 16):
        w = tent_weights(n)
        assert torch.allclose(w, w.flip(0))  # symmetric
        assert (w > 0).all()
        middle = (n - 1) // 2
        assert (w[1:middle + 1] >= w[:middle]).all()  # rises to the centre
        centre = (n - 1) / 2
        assert torch.allclose(w[0], torch.tensor(1 - centre / (centre + 1)))


@pytest.mark.parametrize("frames,length,stride", GRID)
def test_framewise_denoiser_windowed_equals_one_call(frames, length, stride):
    """A denoiser that treats each frame alone gives the same result in windows as in one call."""
    x = torch.randn(2, frames, 3, 4)  # frames on axis 1

    def framewise(v, indices=None):
        return torch.tanh(v) * 2 + v.mean(dim=(-1, -2), keepdim=True)

    out = windowed(framewise, x, length, stride, dim=1)
    assert torch.allclose(out, framewise(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("frames,length,stride", [(20, 16, 8), (33, 8, 3), (7, 4, 2), (32, 16, 8)])
def test_window_ids_blend_with_the_tent_weights(frames, length, stride):
    """A mock returning its window's number shows each frame's weights: the output is
    sum_k k * w_k(frame) / sum_k w_k(frame), with w the tent weight at the frame's place in window k."""
    windows = context_windows(frames, length, stride)
    calls = []

    def window_id(v, indices):
        calls.append(list(indices))
        return torch.full_like(v, float(len(calls) - 1))

    out = windowed(window_id, torch.zeros(frames, 1), length, stride)
    assert calls == windows
    w = tent_weights(length).tolist()
    for f in range(frames):
        holders = [(k, win.index(f)) for k, win in enumerate(windows) if f in win]
        expected = sum(k * w[pos] for k, pos in holders) / sum(w[pos] for _, pos in holders)
        assert out[f, 0].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_windowed_keeps_dtype_and_passes_indices():
    x = torch.randn(12, 2, dtype=torch.bfloat16)
    seen = []
    out = windowed(lambda v, idx: (seen.append(idx), v)[1], x, 8, 4)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
    assert seen == [list(range(0, 8)), list(range(4, 12))]


DILATED = [(f, n, s, d) for f in (1, 5, 17, 48, 50, 97) for n in (4, 16) for s in (2, 8) for d in (2, 3, 7) if s <= n]


@pytest.mark.parametrize("frames,length,stride,dilation", DILATED)
def test_dilated_windows_lay_out_each_interleaved_sequence(frames, length, stride, dilation):
    """Dilation d: the frames j, j + d, j + 2d, ... of each j < d are laid out as a video of their own."""
    windows = context_windows(frames, length, stride, dilation)
    assert sorted({i for w in windows for i in w}) == list(range(frames))
    for j in range(min(dilation, frames)):
        sequence = list(range(j, frames, dilation))
        own = [w for w in windows if w[0] % dilation == j]
        assert own == [[sequence[i] for i in w] for w in context_windows(len(sequence), length, stride)]
    for w in windows:
        assert all(b - a == dilation for a, b in zip(w, w[1:]))  # d apart
        assert len(w) <= length


def test_dilated_window_examples():
    assert context_windows(48, 16, 8, 3) == [list(range(j, 48, 3)) for j in range(3)]  # one window per sequence
    assert context_windows(2, 16, 8, 3) == [[0], [1]]
    assert [w[:2] for w in context_windows(96, 16, 8, 3)] == [[0, 3], [24, 27], [48, 51], [1, 4], [25, 28],
                                                              [49, 52], [2, 5], [26, 29], [50, 53]]


@pytest.mark.parametrize("frames,length,stride,dilation", DILATED[::5])
def test_framewise_denoiser_dilated_windows_equal_one_call(frames, length, stride, dilation):
    x = torch.randn(frames, 3, 4)
    out = windowed(lambda v, idx: torch.tanh(v) * 2, x, length, stride, dilation=dilation)
    assert torch.allclose(out, torch.tanh(x) * 2, atol=1e-6, rtol=1e-6)


def test_window_positions_count_time_in_the_window_spacing():
    assert window_positions(list(range(8, 24))).tolist() == list(range(16))  # consecutive: 0, 1, 2, ...
    assert window_positions(list(range(0, 48, 3)), 3).tolist() == list(range(16))
    # the sequence starting at frame 2 runs 2/3 of a step behind frame 0's (sub-frame positions)
    assert window_positions(list(range(2, 48, 3)), 3) == pytest.approx([k + 2 / 3 for k in range(16)])
    # a later window of the same sequence: whole steps from its own start, the same fraction
    assert window_positions([49, 52, 55], 3) == pytest.approx([1 / 3, 4 / 3, 7 / 3])
