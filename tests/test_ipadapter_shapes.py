"""The Shapes IP-Adapter by its effect: a blue reference makes colourless prompts blue while the kind follows the
prompt, and the chain in one call: the Shapes ControlNet, a LoRA and the adapter each keep their own effect (the
outline the place, the LoRA's word the background, the reference the colour), turning one off removing only its
own."""

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


def _black_background_lora(root):
    """The chain's LoRA: "zxq background" taught as a black background (96 pictures of one large shape of any kind,
    colour and place on black, captioned "a <colour> <kind> on the <place>, zxq background"; 150 steps, rank 8)."""
    import csv

    import numpy as np

    from diffstudio.demo.shapes import COLORS, KINDS, POSITIONS, render
    from diffstudio.train.lora import LoRATrainConfig, train_lora

    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(11)
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i in range(96):
            kind, color, place = (str(rng.choice(values)) for values in (KINDS, list(COLORS), POSITIONS))
            render(Scene((ShapeSpec(kind, color, place, "large"),), background=("black",)), 64).save(data / f"{i}.png")
            writer.writerow([f"{i}.png", f"a {color} {kind} on the {place}, zxq background"])
    return train_lora(LoRATrainConfig(data=str(data), out=str(root / "zxq-background.safetensors"), rank=8, steps=150,
                                      batch_size=8, lr=2e-3, warmup=10, seed=0, checkpoint_every=1000))


@pytest.mark.skipif(not CONTROLNET.exists(), reason="the Shapes ControlNet is not built")
def test_controlnet_lora_and_ip_adapter_in_one_call_each_keep_their_effect(models, tmp_path):
    """The chain in one call: the outline places the star, a LoRA's new word paints the background, the reference
    colours the shape; turning one off removes only its effect. Measured (seeds 0-7, "a star, zxq background"):
    all three 8/8 on the left, 8/8 green, 8/8 black background; without the ControlNet 1/8 on the left; without
    the adapter 0/8 green; without the LoRA 1/8 black. The prompt names the kind because an IP-Adapter transfers
    content as well as colour: with "a shape" the reference's square wins over the outline (docs/ipadapter.md)."""
    from diffstudio.demo.score import read_background
    from diffstudio.pipeline.control import ControlNetUnit
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    lora = _black_background_lora(tmp_path)
    controlnet = models.add_controlnet(CONTROLNET)
    adapter = models.add_ip_adapter(WEIGHTS)
    unit = ControlNetUnit(controlnet, outline(Scene((ShapeSpec("star", "blue", "left", "large"),))))
    image_prompt = ImagePrompt(reference("green"), scale=1.0, model=adapter)

    def rates(control: bool, with_lora: bool, ip: bool) -> dict:
        chained = models.clone()
        if with_lora:
            chained.apply_lora(lora)
        pipe = diffstudio.Pipeline(chained)
        hits = {"left": 0, "green": 0, "black": 0}
        for seed in range(8):
            image = pipe("a star, zxq background", seed=seed, progress=False, controlnets=[unit] if control else [],
                         ip_adapter=image_prompt if ip else None)[0]
            got = _largest(image)
            hits["left"] += got is not None and got.position == "left"
            hits["green"] += got is not None and got.color == "green"
            hits["black"] += read_background(image) == ("black",)
        return {k: v / 8 for k, v in hits.items()}

    chain = rates(True, True, True)
    assert min(chain.values()) >= 0.75, chain
    no_control, no_lora, no_ip = rates(False, True, True), rates(True, False, True), rates(True, True, False)
    assert no_control["left"] <= 0.25 and no_control["green"] >= 0.75 and no_control["black"] >= 0.75, no_control
    assert no_lora["black"] <= 0.25 and no_lora["left"] >= 0.75 and no_lora["green"] >= 0.75, no_lora
    assert no_ip["green"] <= 0.25 and no_ip["left"] >= 0.75 and no_ip["black"] >= 0.75, no_ip
