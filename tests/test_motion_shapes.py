"""The shipped Shapes motion module (diffstudio/demo/weights/shapes-motion.safetensors) on the demo model, by effect.

"a red circle moving to the right", 16 frames, seeds 0-11, the demo model's 20 Euler steps at CFG 3, the linear
schedule the module was trained on (diffstudio.demo.motion_eval). Measured for the shipped file (docs/animatediff.md,
"Shapes motion module"), with noise drawn per frame: the scorer reads a red circle in >= 14 of 16 frames in all 12
seeds (15.8 frames on average), its centre moves right monotonically (no step back beyond the scorer's 0.01 jitter)
in 11 of 12, and it travels right by 0.52-0.57 of the picture from the first frame to the last (the frame-wise image
model keeps it on the right: travel within +-0.04). With one noise draw shared by all frames (``same_noise``, as
``VideoPipeline(same_noise=True)``) the path is monotonic in 12 of 12.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import diffstudio
from diffstudio.demo.motion_eval import evaluate_motion
from diffstudio.loader import default_model_path
from diffstudio.motion_loading import add_motion_module
from diffstudio.train.motion import motion_training_info

MOTION = Path(__file__).resolve().parent.parent / "diffstudio" / "demo" / "weights" / "shapes-motion.safetensors"
pytestmark = pytest.mark.skipif(not (default_model_path().exists() and MOTION.exists()),
                                reason="the demo model or its motion module is not built "
                                       "(python -m diffstudio.demo motion)")


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


def test_the_shipped_file_is_small_fp16_and_loads_with_add_motion_module(models):
    from safetensors import safe_open

    assert MOTION.stat().st_size < 10 * 2**20
    with safe_open(str(MOTION), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    motion = add_motion_module(models, MOTION)
    assert motion.config.max_frames >= 16 and motion.config.level_channels == [64, 128, 128]
    assert motion_training_info(MOTION)["schedule"] == "linear"


def test_a_red_circle_moves_to_the_right(models):
    motion = add_motion_module(models, MOTION)
    result = evaluate_motion(models, motion, seeds=range(12))
    assert sum(s["found"] >= 14 for s in result["per_seed"]) >= 10, result  # measured 12 of 12
    assert result["monotonic"] >= 10, result  # measured 11 of 12
    assert all(s["travel"] >= 0.4 for s in result["per_seed"]), result  # measured 0.52 .. 0.57


def test_with_one_noise_for_all_frames_the_path_is_monotonic(models):
    motion = add_motion_module(models, MOTION)
    result = evaluate_motion(models, motion, seeds=range(12), same_noise=True)
    assert result["monotonic"] >= 10 and result["ok"] >= 10, result  # measured 12 and 12 of 12


def test_without_the_module_the_circle_stays_put(models):
    result = evaluate_motion(models, None, seeds=range(4))
    assert all(abs(s["travel"]) < 0.1 for s in result["per_seed"]), result  # measured within +-0.04
