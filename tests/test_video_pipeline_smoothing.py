"""In-loop deflickering (DiffSynth's method with FastBlend) on a flickering re-render: the trained Shapes demo
model re-renders a camera pan frame by frame, each frame from its own noise, so consecutive frames disagree.
The flicker - the mean absolute difference between consecutive frames after undoing the pan's known shift - must
drop at least 3x with smoothing, in the loop and after decoding."""

from __future__ import annotations

import numpy as np
import pytest

import diffstudio
from diffstudio.demo.shapes import Scene, ShapeSpec, render
from diffstudio.video.render import VideoPipeline
from diffstudio.video.smoothing import FastBlendSmoother

SHIFT = 2  # pixels the camera moves right per frame
FRAMES = 12


def pan() -> list[np.ndarray]:
    scene = Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "right")), ("white",))
    big = np.asarray(render(scene, size=128))
    return [big[32:96, SHIFT * i:SHIFT * i + 64] for i in range(FRAMES)]


def flicker(frames) -> float:
    """Frame i + 1 shows at column c what frame i showed at column c + SHIFT."""
    f = [np.asarray(x, np.float32) for x in frames]
    return float(np.mean([np.abs(f[i + 1][:, :-SHIFT] - f[i][:, SHIFT:]).mean() for i in range(len(f) - 1)]))


@pytest.fixture(scope="module")
def rerender():
    pipe = VideoPipeline(diffstudio.load())
    clip = pan()
    assert flicker(clip) == 0.0  # the shift is exactly the pan

    def run(**kwargs):
        return flicker(pipe("a red circle and a blue square", init_video=clip, strength=0.6, steps=5, seed=3,
                            progress=False, **kwargs))

    return run


@pytest.mark.parametrize("steps", [[2], [-1]], ids=["in-loop", "after-decoding"])
def test_smoothing_cuts_the_flicker_at_least_threefold(rerender, steps):
    plain = rerender()
    smoothed = rerender(smoother=FastBlendSmoother(window_size=5), smoother_steps=steps)
    assert plain > 3 * smoothed, (plain, smoothed)
