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


@pytest.mark.slow  # 95 s; its bar is not met yet (xfail), so it runs with `pytest -m slow`
@pytest.mark.skipif(not CONTROLNET.exists(), reason="the Shapes ControlNet is not built")
@pytest.mark.xfail(strict=True, reason="measured: with both, green 8/8 but a star on the left 0/8: the adapter at "
                                       "scale 1 overrides the outline (no LoRA in the chain yet)")
def test_controlnet_and_ip_adapter_in_one_call_each_keep_their_effect(models):
    from diffstudio.pipeline.control import ControlNetUnit
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    controlnet = models.add_controlnet(CONTROLNET)
    adapter = models.add_ip_adapter(WEIGHTS)
    pipe = diffstudio.Pipeline(models)
    unit = ControlNetUnit(controlnet, outline(Scene((ShapeSpec("star", "blue", "left", "large"),))))
    image_prompt = ImagePrompt(reference("green"), scale=1.0, model=adapter)

    def rates(control: bool, ip: bool) -> dict:
        hits = {"star left": 0, "green": 0}
        for seed in range(8):
            got = _largest(pipe("a shape, white background", seed=seed, progress=False,
                                controlnets=[unit] if control else [], ip_adapter=image_prompt if ip else None)[0])
            hits["star left"] += got is not None and got.kind == "star" and got.position == "left"
            hits["green"] += got is not None and got.color == "green"
        return {k: v / 8 for k, v in hits.items()}

    both, no_ip, no_control = rates(True, True), rates(True, False), rates(False, True)
    assert both["star left"] >= 0.6 and both["green"] >= 0.75, both
    assert no_ip["star left"] >= 0.6 and no_ip["green"] <= 0.5, no_ip          # only the colour went
    assert no_control["green"] >= 0.75 and no_control["star left"] <= 0.25, no_control  # only the outline went
