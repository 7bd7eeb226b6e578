"""Features tested by their effect on the picture, with the packaged Shapes demo model and the scorer.

Thresholds sit well under the measured quality (docs/shapes.md), so a pass means the feature
works, not that the model got lucky; a regression in the engine (wrong scaling, wrong
schedule, broken conditioning) makes the scorer fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import diffstudio
from diffstudio.demo.evaluate import USUAL_STEPS
from diffstudio.demo.score import dominant_color, score_prompt
from diffstudio.loader import default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().exists(),
                                reason="the demo model is not built (python -m diffstudio.demo train)")

SEEDS = range(6)


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(diffstudio.load())


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def share(results: list[bool]) -> float:
    return sum(results) / len(results)


def test_demo_model_is_detected_as_sd15_by_structure():
    from diffstudio.io.state_dict import read_state_dict

    det = diffstudio.detect(read_state_dict(default_model_path()))  # metadata not passed: shapes only
    assert det.family == "sd15" and set(det.components) == {"unet", "vae", "text_encoder"}


def test_txt2img_draws_the_prompted_colour_and_shape(pipe):
    prompts = ["a red circle in the center, white background", "a blue square on the left, white background",
               "a yellow triangle on the right, white background"]
    results = [score_prompt(pipe(p, seed=s, progress=False)[0], p) for p in prompts for s in SEEDS[:3]]
    # Per-attribute checks alone are lenient: on pure noise the scorer finds *some* blob of the
    # right colour or kind about half the time (docs/shapes.md), so the bar is on all attributes.
    assert share([r["color_ok"] for r in results]) >= 0.75
    assert share([r["all_ok"] for r in results]) >= 0.5


def test_the_readme_prompt_draws_a_red_circle(pipe):
    """The main job's prompt, phrased as people write it (no position word, "on a ... background"): a red
    circle in every image (measured 12 of 12 seeds), and no other shape in most (8 of 12; docs/shapes.md)."""
    prompt = "a red circle on a white background"
    results = [score_prompt(pipe(prompt, seed=s, progress=False)[0], prompt) for s in SEEDS]
    assert all(r["all_ok"] for r in results)
    assert share([r["count_ok"] for r in results]) >= 0.5


def test_same_seed_same_image_different_seed_different(pipe):
    a = pipe("a green star, white background", seed=3, progress=False)[0]
    b = pipe("a green star, white background", seed=3, progress=False)[0]
    c = pipe("a green star, white background", seed=4, progress=False)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_img2img_low_strength_keeps_the_input_high_strength_follows_the_prompt(pipe):
    from diffstudio.demo.shapes import Scene, ShapeSpec, render

    init = render(Scene((ShapeSpec("circle", "red", "center"),), ("white",)), size=64)
    # Low strength refines the input: with a prompt that describes it, the picture stays. (With a
    # conflicting prompt the tiny demo model recolours even at 0.2: its 8x8 latent's colour is decided at
    # low noise too; docs/shapes.md, "Known limits".)
    kept = [pipe("a red circle in the center, white background", init_image=init, strength=0.2, seed=s,
                 progress=False)[0] for s in SEEDS[:3]]
    assert min(psnr(k, init) for k in kept) > 20
    assert share([score_prompt(k, "a red circle in the center")["all_ok"] for k in kept]) >= 0.66
    changed = [pipe("a blue square on the left, white background", init_image=init, strength=0.9, seed=s,
                    progress=False)[0] for s in SEEDS]
    assert share([score_prompt(c, "a blue square")["color_ok"] for c in changed]) >= 0.5


def test_inpainting_changes_only_the_masked_area(pipe):
    from diffstudio.demo.shapes import Scene, ShapeSpec, render

    init = render(Scene((ShapeSpec("circle", "red", "left"),), ("white",)), size=64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half only
    outs = [pipe("a blue square on the right, white background", init_image=init, mask=mask, strength=1.0,
                 seed=s, progress=False)[0] for s in SEEDS]
    for out in outs:
        assert np.array_equal(np.asarray(out)[:, :32], np.asarray(init)[:, :32])
    right_blue = [dominant_color(out, region=(0.5, 0.0, 1.0, 1.0)) == "blue" for out in outs]
    assert share(right_blue) >= 0.5


def test_the_sampler_check_covers_every_registered_sampler():
    from diffstudio.sampling.samplers import SAMPLERS

    assert set(USUAL_STEPS) == set(SAMPLERS)  # a new sampler needs its usual step count in USUAL_STEPS


@pytest.mark.parametrize("sampler,steps", list(USUAL_STEPS.items()))
def test_every_sampler_draws_the_prompt(pipe, sampler, steps):
    prompt = "a red circle in the center, white background"
    results = [score_prompt(pipe(prompt, seed=s, sampler=sampler, steps=steps, progress=False)[0], prompt)
               for s in SEEDS[:3]]
    assert share([r["all_ok"] for r in results]) >= 0.66
