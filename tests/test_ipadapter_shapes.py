"""The Shapes IP-Adapter by its effect: a blue reference makes colourless prompts blue while the kind follows the
prompt, and with the Shapes ControlNet in the same call each keeps its own effect (the outline the kind and place,
the reference the colour), turning either off removing only its own."""

from __future__ import annotations

import pytest

import diffstudio
from diffstudio.demo.controlnet_build import WEIGHTS as CONTROLNET
from diffstudio.demo.controlnet_build import outline
from diffstudio.demo.ip_adapter_build import WEIGHTS, color_rate, reference
from diffstudio.demo.score import read_image
from diffstudio.demo.shapes import Scene, ShapeSpec
from diffstudio.loader import default_model_path

pytestmark = pytest.mark.skipif(not (default_model_path().exists() and WEIGHTS.exists()),
                                reason="the demo model or the Shapes IP-Adapter is not built")
SEEDS = range(12)


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


def test_a_blue_reference_makes_a_colourless_prompt_blue(models):
    adapter = models.add_ip_adapter(WEIGHTS)
    prompt = "a circle in the center, white background"
    with_ref = color_rate(models, prompt, "blue", adapter, SEEDS)
    without = color_rate(models, prompt, "blue", None, SEEDS)
    assert with_ref["color"] >= 0.8, with_ref
    assert without["color"] < 0.5, without
    assert with_ref["kind"] >= 0.6, with_ref  # the kind follows the prompt, not the reference's square


def _largest(image):
    shapes = read_image(image)
    return max(shapes, key=lambda s: s.area) if shapes else None


@pytest.mark.skipif(not CONTROLNET.exists(), reason="the Shapes ControlNet is not built")
def test_controlnet_and_ip_adapter_in_one_call_each_keep_their_effect(models):
    """The prompt names the kind, the outline places it, the reference colours it. Measured (seeds 0-7): both
    7/8 a star on the left, 8/8 green; without the adapter 8/8 a star on the left, 0/8 green (yellow); without
    the ControlNet 0/8 on the left. A prompt that names no kind lets the adapter carry its reference's square
    into the picture too (IP-Adapter transfers content, not only colour), so the chain's prompt names one."""
    from diffstudio.pipeline.control import ControlNetUnit
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    controlnet = models.add_controlnet(CONTROLNET)
    adapter = models.add_ip_adapter(WEIGHTS)
    pipe = diffstudio.Pipeline(models)
    unit = ControlNetUnit(controlnet, outline(Scene((ShapeSpec("star", "blue", "left", "large"),))))
    image_prompt = ImagePrompt(reference("green"), scale=1.0, model=adapter)

    def rates(control: bool, ip: bool) -> dict:
        hits = {"star left": 0, "left": 0, "green": 0}
        for seed in range(8):
            got = _largest(pipe("a star, white background", seed=seed, progress=False,
                                controlnets=[unit] if control else [], ip_adapter=image_prompt if ip else None)[0])
            hits["left"] += got is not None and got.position == "left"
            hits["star left"] += got is not None and got.kind == "star" and got.position == "left"
            hits["green"] += got is not None and got.color == "green"
        return {k: v / 8 for k, v in hits.items()}

    both, no_ip, no_control = rates(True, True), rates(True, False), rates(False, True)
    assert both["star left"] >= 0.75 and both["green"] >= 0.75, both
    assert no_ip["star left"] >= 0.75 and no_ip["green"] <= 0.25, no_ip  # only the colour went
    assert no_control["left"] <= 0.25, no_control  # only the placement went
