"""Region prompts on every family with a tiny random fixture (SD 1.x is in test_regions.py).

Both modes run, and the hook is wired right: a region whose prompt is the global prompt leaves the
generation as it was (within float tolerance), in either mode, wherever the region lies.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import diffstudio
from diffstudio import Region


def _sdxl(t, folder):
    return t.write_diffusers_folder(folder, t.reference_models())


def _sd3(t, folder):
    return t.write_diffusers_folder(folder, t.reference_models())


def _star(t, folder):
    return t.write_diffusers_folder(folder, *t.reference_models())


BUILDERS = {"tiny_sdxl": _sdxl, "tiny_kolors": _star, "tiny_sd3": _sd3, "tiny_flux": _star, "tiny_hunyuan": _star}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pipe(request, tmp_path_factory):
    module = importlib.import_module(f"tests.{request.param}")  # a missing fixture module is a failure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = BUILDERS[request.param](module, tmp_path_factory.mktemp(request.param) / "model")
        return diffstudio.Pipeline(diffstudio.load(folder))


def final_x0(pipe, **kwargs) -> torch.Tensor:
    seen = []
    pipe("a red circle", "blurry", width=64, height=64, steps=2, seed=3, cfg_scale=3.0, progress=False,
         callback=lambda i, n, x, d: seen.append(d), **kwargs)
    return seen[-1]


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_regions_run_and_a_region_with_the_global_prompt_changes_nothing(pipe, mode):
    plain = final_x0(pipe)
    scale = plain.abs().max()
    # Joint attention (SD3, FLUX): a region's text tokens see only the image tokens of its area, so
    # they drift from the global prompt's unless the region covers the whole image.
    joint = mode == "attention" and pipe.models.denoiser.region_attention == "joint"
    box = None if joint else (0.25, 0.0, 1.0, 0.75)
    same = final_x0(pipe, regions=[Region("a red circle", box=box)], region_mode=mode)
    noise = (same - plain).abs().max()
    assert noise <= 1e-4 * scale, pipe.family.name
    other = final_x0(pipe, regions=[Region("a blue square", box=(0.5, 0.0, 1.0, 1.0), negative_prompt="red"),
                                    Region("a star", box=(0.0, 0.0, 0.5, 0.5), feather=0.1)], region_mode=mode)
    assert torch.isfinite(other).all()
    assert (other - plain).abs().max() > 10 * max(noise, 1e-6 * scale), pipe.family.name  # the prompts reach it
