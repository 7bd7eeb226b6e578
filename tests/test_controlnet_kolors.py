"""Kolors ControlNets (Kwai-Kolors/Kolors-ControlNet-*: diffusers ControlNetModel folders whose encoder takes
ChatGLM's 4096-wide text through ``encoder_hid_proj``): placed as Kolors by their structure, residuals equal to
diffusers', and a unit in a Kolors pipeline acting (scale 0 = the base image bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.controlnet_loading import read_controlnet
from diffstudio.errors import ControlNetMismatchError
from diffstudio.models.layers import timestep_embedding
from tests.tiny_controlnet import rel_err
from tests.tiny_kolors import SIZE_EMBED, TEXT_WIDTH, UNET, reference_models, write_diffusers_folder
from tests.tiny_sd15 import randomise

HINT_WIDTHS = (16, 32, 96, 256)  # the released hint encoder


@pytest.fixture(scope="module")
def reference_controlnet():
    from diffusers import ControlNetModel

    config = {k: v for k, v in UNET.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    model = ControlNetModel(**config, conditioning_embedding_out_channels=HINT_WIDTHS)
    randomise(model, 3)
    with torch.no_grad():  # a hint encoder with gain ~1, so the control image visibly drives the residuals
        for name, p in model.controlnet_cond_embedding.named_parameters():
            p.mul_(3.0 if name.endswith("weight") else 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def controlnet_folder(reference_controlnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kolors-cn") / "Kolors-ControlNet-Canny"
    reference_controlnet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return diffstudio.load(write_diffusers_folder(tmp_path_factory.mktemp("kolors") / "tiny-kolors",
                                                  *reference_models()))


def test_a_kolors_controlnet_is_placed_as_kolors_with_its_text_projection(controlnet_folder):
    detection, part = read_controlnet(controlnet_folder)
    assert detection.family == "kolors"
    assert part.config.encoder_hid_dim == TEXT_WIDTH and part.config.adm_in_channels == TEXT_WIDTH + 6 * SIZE_EMBED


def test_residuals_match_diffusers(reference_controlnet, models, controlnet_folder):
    ours = models.add_controlnet(controlnet_folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), scale_factor=8, mode="bilinear")
    t = torch.tensor([10.5, 700.0])
    text = torch.randn(2, 7, TEXT_WIDTH, generator=g)  # ChatGLM's hidden states, before encoder_hid_proj
    pooled = torch.randn(2, TEXT_WIDTH, generator=g)
    time_ids = torch.tensor([[512.0, 768, 0, 16, 512, 768]] * 2)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SIZE_EMBED).reshape(2, -1)], dim=-1)
    with torch.no_grad():
        # Kolors' own ControlNet class (Kwai-Kolors/Kolors, kolors/models/controlnet.py) projects ChatGLM's states
        # with its encoder_hid_proj first; diffusers' ControlNetModel holds that layer but leaves it to the caller.
        down, mid = reference_controlnet(x, t, reference_controlnet.encoder_hid_proj(text), hint, return_dict=False,
                                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        got = ours(x, hint, t, text, y)
    expected = [*down, mid]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and b.norm() > 0 and rel_err(a, b) < 1e-4


def test_a_unit_acts_in_a_kolors_pipeline_and_scale_zero_is_the_base(models, controlnet_folder):
    controlnet = models.add_controlnet(controlnet_folder)
    pipe = diffstudio.Pipeline(models)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255

    def render(scale):
        units = [] if scale is None else [diffstudio.ControlNetUnit(controlnet, edges, scale=scale)]
        return np.asarray(pipe("一只猫 a cat", width=64, height=64, steps=3, seed=1, controlnets=units,
                               progress=False)[0])

    base = render(None)
    np.testing.assert_array_equal(render(0.0), base)
    assert np.abs(render(1.0).astype(int) - base).mean() > 0.5


def test_a_kolors_controlnet_on_an_sdxl_shaped_model_of_another_family_is_refused(controlnet_folder):
    models = diffstudio.load()  # the demo model: SD 1.x
    with pytest.raises(ControlNetMismatchError, match="kolors"):
        models.add_controlnet(controlnet_folder)
