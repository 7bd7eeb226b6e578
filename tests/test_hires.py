"""Hires fix: a first pass at the model's size, an upscale (latent or pixels), an img2img pass at the target size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.hires import HiresFix
from diffstudio.pipeline.request import Request

RUN = dict(steps=4, seed=3, cfg_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_two_passes_at_the_base_and_the_target_size(pipe, upscaler):
    shapes = []
    images = pipe("a red circle", width=64, height=64, hires=HiresFix(scale=1.5, upscaler=upscaler, strength=0.5),
                  callback=lambda i, n, x, d: shapes.append(tuple(x.shape[-2:])), **RUN)
    assert images[0].size == (96, 96)
    assert shapes[:4] == [(8, 8)] * 4 and set(shapes[4:]) == {(12, 12)} and len(shapes) == 4 + 2  # 0.5 of 4 steps
    extra = images[0].info["diffstudio_recipe"]["extra"]["hires"]
    assert extra["first_pass"] == [64, 64] and extra["upscaler"] == upscaler


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_the_second_pass_starts_from_the_upscaled_first(upscaler):
    """At a small strength the second pass keeps what the upscale gave it: the trained demo model's picture,
    enlarged (its VAE reconstructs what it drew; an untrained one would not)."""
    pipe = diffstudio.Pipeline(diffstudio.load())
    run = dict(steps=20, seed=1, progress=False)
    first = np.asarray(pipe("a red circle on the left, white background", **run)[0], dtype=float)
    other = np.asarray(pipe("a blue square on the right, white background", **run)[0], dtype=float)
    hires = pipe("a red circle on the left, white background", hires=HiresFix(2.0, upscaler, strength=0.1), **run)[0]
    smaller = np.asarray(hires.resize((64, 64)), dtype=float)
    assert hires.size == (128, 128)
    assert np.abs(smaller - first).mean() < 0.25 * np.abs(other - first).mean()


def test_init_latents_are_checked(pipe):
    with pytest.raises(InvalidInputError, match="init latent"):
        Request("x", init_latent=torch.zeros(1, 3, 8, 8)).resolve(pipe.models)
    with pytest.raises(InvalidInputError, match="not both"):
        Request("x", init_latent=torch.zeros(1, 4, 8, 8), init_image=np.zeros((64, 64, 3), np.uint8)).resolve(
            pipe.models)
    with pytest.raises(InvalidInputError, match="upscaler"):
        HiresFix(upscaler="esrgan")
    r = Request("x", init_latent=torch.zeros(1, 4, 8, 12)).resolve(pipe.models)
    assert (r.width, r.height, r.strength) == (96, 64, 0.75)
