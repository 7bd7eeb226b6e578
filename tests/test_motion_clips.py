"""The Shapes motion module's training clips (demo/motion_build.py) and the motion scores (demo/motion_eval.py),
read back by the Shapes scorer from rendered frames."""

from __future__ import annotations

import json

import numpy as np

from diffstudio.demo.motion_build import END, JITTER, SLOW, START, motion_clip, write_motion_dataset
from diffstudio.demo.motion_eval import long_render_score, motion_score
from diffstudio.demo.shapes import Scene, ShapeSpec, render_video, sample_background


def crossing(frames: int, start: float, end: float):
    """A red circle moving right from ``start`` to ``end`` (fractions of the side) over ``frames`` frames."""
    background = sample_background(np.random.default_rng(0), split_prob=0.0)
    shape = ShapeSpec(kind="circle", color="red", size="", center=(start, 0.5), radius=0.12)
    return render_video(Scene((shape,), background), None, frames, 64, motion=[(end - start, 0.0)])[0]


def test_without_slow_clips_every_clip_is_a_whole_crossing():
    for i in range(4):
        frames, text = motion_clip(np.random.default_rng([0, i]), directions=("right",))
        assert "slowly" not in text
        kind, color = text.split(" moving")[0].split()[-1], text.split(" moving")[0].split()[-2]
        score = motion_score(frames, color, kind, "right", min_travel=0.0)
        assert score["monotonic"] and abs(score["travel"] - (END - START)) < 2 * JITTER + 0.05, score


def test_a_slow_clip_is_a_third_of_a_crossing_and_says_slowly():
    for i in range(6):
        frames, text = motion_clip(np.random.default_rng([1, i]), directions=("right",), slow_prob=1.0)
        assert " moving slowly to the right" in text
        kind, color = text.split(" moving")[0].split()[-1], text.split(" moving")[0].split()[-2]
        score = motion_score(frames, color, kind, "right", min_travel=0.0)
        assert score["monotonic"], score
        assert abs(score["travel"] - (END - START) / SLOW) < 2 * JITTER + 0.05, score


def test_the_dataset_is_written_again_when_its_recipe_changes(tmp_path):
    write_motion_dataset(tmp_path, 3, n_frames=4, seed=0, slow_prob=0.0)
    first = (tmp_path / "metadata.csv").read_text()
    write_motion_dataset(tmp_path, 3, n_frames=4, seed=0, slow_prob=1.0)
    assert json.loads((tmp_path / "dataset.json").read_text())["slow_prob"] == 1.0
    assert (tmp_path / "metadata.csv").read_text().count("slowly") == 3 and "slowly" not in first


def test_a_steady_long_crossing_keeps_moving_and_a_stall_does_not():
    steady = long_render_score(crossing(48, 0.2, 0.8), "red", "circle", "right")
    assert steady["keeps_moving"] and steady["border_ratio"] < 2, steady
    # each 16-frame window restarting a crossing: quick, then stalled in the middle, then quick again
    stalled = crossing(16, 0.2, 0.55) + crossing(16, 0.55, 0.56) + crossing(16, 0.56, 0.8)
    score = long_render_score(stalled, "red", "circle", "right")
    assert score["border_ratio"] < 2, score  # no jump: the stall is what fails it
    assert not score["keeps_moving"] and score["min_step"] < score["median_step"] / 10, score


def test_a_long_render_without_a_motion_module_does_not_move():
    import diffstudio
    from diffstudio.demo.motion_eval import evaluate_long_render

    result = evaluate_long_render(diffstudio.load(), "a red circle moving to the right", seeds=[0], frames=20,
                                  length=8, stride=4, steps=4)
    (score,) = result["per_seed"]
    assert len(score["centres"]) == 20 and score["found"] >= 16, score
    assert abs(score["travel"]) < 0.1 and not score["keeps_moving"] and result["keeps_moving"] == 0, score
