"""Region prompts judged by their effect, with the packaged Shapes demo model and the scorer:
a red circle asked for on one half and a blue square on the other land where they were asked,
in both modes, with the layout both ways round (so the model's habits cannot pass the test)."""

from __future__ import annotations

import pytest

import diffstudio
from diffstudio import Region
from diffstudio.demo.score import dominant_color
from diffstudio.loader import default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().exists(),
                                reason="the Shapes demo weights (diffstudio/demo/weights/shapes-sd.safetensors) "
                                       "are not built yet (python -m diffstudio.demo train)")

SEEDS = range(5)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
GLOBAL = "a red circle and a blue square, white background"


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(diffstudio.load())


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_each_half_gets_its_own_prompt(pipe, mode):
    hits = []
    for red_side, blue_side in ((LEFT, RIGHT), (RIGHT, LEFT)):
        # Each region prompt names its side: the demo model draws one shape per prompt where the
        # prompt says, and in the middle when it says nothing (docs/regions.md, "With the Shapes
        # model"). The global prompt names no side: without the regions each colour's side is a coin toss.
        red, blue = ("on the left", "on the right") if red_side == LEFT else ("on the right", "on the left")
        regions = [Region(f"a red circle {red}", box=red_side), Region(f"a blue square {blue}", box=blue_side)]
        for seed in SEEDS:
            image = pipe(GLOBAL, seed=seed, regions=regions, region_mode=mode, progress=False)[0]  # demo: 64x64
            hits.append(dominant_color(image, region=red_side) == "red"
                        and dominant_color(image, region=blue_side) == "blue")
    assert sum(hits) / len(hits) >= 0.8, f"{mode}: {sum(hits)} of {len(hits)} images put each colour in its half"
