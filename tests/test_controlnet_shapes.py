"""The shipped Shapes ControlNet, tested by its effect on the demo model (docs/controlnet.md, "The Shapes ControlNet").

The prompt says only the colour ("a red shape"); the control image is the outline of a shape (canny edges of a
rendered scene). Over 12 seeds the demo scorer must read the outline's kind and position in the picture, in the
prompt's colour. Without the ControlNet the same prompt draws no star on the left at all (checked below too, so the
effect is the ControlNet's and not the base model's habit: "a red shape" alone draws a square at the top).
"""

from __future__ import annotations

import pytest

import diffstudio
from diffstudio.demo.controlnet_build import CHECKS, WEIGHTS, score_outline

SEEDS = range(12)


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


@pytest.fixture(scope="module")
def controlnet(models):
    return models.add_controlnet(WEIGHTS)


def test_the_shipped_file_is_a_small_fp16_controlnet_for_the_demo_model(controlnet, models):
    import torch

    assert WEIGHTS.stat().st_size < 10_000_000
    assert controlnet.config.model_channels == models.unet.config.model_channels
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_a_star_outline_on_the_left_draws_a_star_on_the_left_in_the_prompts_colour(models, controlnet):
    scene, prompt = CHECKS["star on the left"]
    scores = score_outline(models, controlnet, scene, prompt, SEEDS)
    assert scores["kind"] >= 0.8 and scores["position"] >= 0.9, scores
    assert scores["color"] >= 0.9, scores
    without = score_outline(models, None, scene, prompt, SEEDS)
    assert without["kind"] <= 0.25 and without["position"] <= 0.25, without  # the base model alone does not


def test_a_square_outline_at_the_top_draws_a_square_at_the_top(models, controlnet):
    scene, prompt = CHECKS["square at the top"]
    scores = score_outline(models, controlnet, scene, prompt, SEEDS)
    assert scores["kind"] >= 0.8 and scores["position"] >= 0.9 and scores["color"] >= 0.9, scores
