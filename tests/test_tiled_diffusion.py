"""Tiled diffusion (MultiDiffusion): tiles cover the latent, their blend is a weighted mean, one tile over the
whole latent is the plain run bit for bit, and ControlNet hints are cropped to each tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.tiled_diffusion import TiledDenoiser, TiledDiffusion, tile_weight
from diffstudio.pipeline.tiled_vae import tile_starts

RUN = dict(steps=3, seed=2, cfg_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


@pytest.mark.parametrize("size, tile, overlap", [(8, 8, 4), (16, 8, 4), (17, 8, 3), (24, 10, 2), (5, 8, 2)])
def test_tiles_cover_every_pixel_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = torch.zeros(size)
    for s in starts:
        covered[s:s + min(tile, size)] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_the_blend_is_a_weighted_mean_of_the_tiles_predictions():
    class Echo:
        kind = "ve"

        def __call__(self, x, sigma, **extra):
            return x * 2 + extra["tile"][0]  # depends on the pixel and on the tile

    x = torch.randn(1, 4, 8, 12)
    tiles = [(0, left, 8, 8) for left in tile_starts(12, 8, 4)]
    out = TiledDenoiser(Echo(), tiles, tile_weight(8, 8))(x, torch.tensor([1.0]))
    assert torch.allclose(out, x * 2, atol=1e-5)  # every tile starts at top 0: the mean of equal values
    assert tile_weight(5, 7).min() > 0 and tile_weight(5, 7)[2, 3] == 1


def test_one_tile_over_the_whole_image_is_the_plain_run(pipe):
    plain = np.asarray(pipe("a red circle", width=64, height=64, **RUN)[0])
    tiled = pipe("a red circle", width=64, height=64, modules=[TiledDiffusion(tile=64, overlap=16)], **RUN)[0]
    assert np.array_equal(np.asarray(tiled), plain)
    assert tiled.info["diffstudio_recipe"]["extra"]["tiled_diffusion"] == {"tile": [64, 64], "overlap": 16}


def test_a_wide_image_in_tiles_with_a_controlnet_hint_per_tile(pipe):
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
    from diffstudio.pipeline.control import ControlNetUnit

    net = ControlNetModel(ControlNetConfig.from_unet(pipe.models.configs["unet"],
                                                     hint_block_channels=[16, 32, 32, 32])).eval()
    module = TiledDiffusion(tile=64, overlap=32)
    calls = []
    image = pipe("a red circle", width=128, height=64, controlnets=[ControlNetUnit(net, np.zeros((64, 128, 3)))],
                 modules=[module], callback=lambda *a: calls.append(1), **RUN)[0]
    assert image.size == (128, 64) and len(calls) == 3


def test_attention_regions_and_bad_tiles_are_refused(pipe):
    with pytest.raises(InvalidInputError, match="overlap"):
        TiledDiffusion(tile=64, overlap=64)
    with pytest.raises(InvalidInputError, match="latent-mode regions"):
        pipe("x", width=128, height=64, regions=[diffstudio.Region("a red circle", box=(0, 0, .5, 1))],
             region_mode="attention", modules=[TiledDiffusion(tile=64, overlap=32)], **RUN)
