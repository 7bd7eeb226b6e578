"""ControlNet units in the pipeline: a unit that adds nothing gives the base image bit for bit (scale 0, zero
convolutions, a start/end outside the run), units sum their residuals, the control image is fitted to the
output size, the recipe records the units, and a ControlNet file loads through `models.add_controlnet`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffstudio
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
from diffstudio.pipeline.control import ControlNetUnit, control_image

RUN = dict(width=64, height=64, steps=3, seed=4, cfg_scale=3.0, progress=False)


def hint_picture() -> np.ndarray:
    picture = np.full((64, 64, 3), 255, np.uint8)
    picture[16:48, 8:30] = 0  # a dark block on the left
    return picture


@pytest.fixture(scope="module")
def pipe():
    return diffstudio.Pipeline(untrained_demo_models())


def controlnet(pipe, zero: bool = False, seed: int = 0) -> ControlNetModel:
    config = ControlNetConfig.from_unet(pipe.models.configs["unet"], hint_block_channels=[16, 32, 32, 32])
    torch.manual_seed(seed)
    model = ControlNetModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name:
                p.zero_() if zero else p.normal_(0, 0.3)
    return model


def image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe("a red circle", **RUN, **kwargs)[0], dtype=np.int16)


def test_units_that_add_nothing_give_the_base_image_bit_for_bit(pipe):
    base = image(pipe)
    net = controlnet(pipe)
    assert np.array_equal(image(pipe, controlnets=[ControlNetUnit(net, hint_picture(), scale=0.0)]), base)
    zero = ControlNetUnit(controlnet(pipe, zero=True), hint_picture())
    assert np.array_equal(image(pipe, controlnets=[zero]), base)
    late = ControlNetUnit(net, hint_picture(), start=0.95, end=1.0)  # the last call is at step 3 of 3
    assert np.array_equal(image(pipe, controlnets=[late]), base)
    assert np.abs(image(pipe, controlnets=[ControlNetUnit(net, hint_picture())]) - base).max() > 0


def test_units_sum_their_residuals(pipe):
    net = controlnet(pipe)
    seen = []
    capture = dict(callback=lambda i, n, x, d: seen.append(d))
    pipe("a red circle", **RUN, controlnets=[ControlNetUnit(net, hint_picture(), scale=1.0)], **capture)
    whole = seen[-1]
    seen.clear()
    halves = [ControlNetUnit(net, hint_picture(), scale=0.5), ControlNetUnit(net, hint_picture(), scale=0.5)]
    pipe("a red circle", **RUN, controlnets=halves, **capture)
    assert torch.allclose(seen[-1], whole, atol=1e-4, rtol=1e-4)


def test_control_mode_control_leaves_the_unconditional_rows_alone(pipe):
    """With CFG 1 only the conditional rows are computed, so "control" equals "balanced"; with CFG 3 it differs."""
    net = controlnet(pipe)
    at = {**RUN, "cfg_scale": 1.0}

    def run(mode, settings):
        unit = ControlNetUnit(net, hint_picture(), control_mode=mode)
        return np.asarray(pipe("a red circle", **settings, controlnets=[unit])[0], dtype=np.int16)

    assert np.array_equal(run("control", at), run("balanced", at))
    assert not np.array_equal(run("control", RUN), run("balanced", RUN))
    assert not np.array_equal(run("prompt", RUN), run("balanced", RUN))


def test_the_control_image_is_scaled_to_cover_and_centre_cropped():
    wide = np.zeros((32, 128, 3), np.uint8)
    wide[:, 60:68] = 255  # a bright stripe in the middle
    hint = control_image(wide, None, 64, 64)
    assert hint.shape == (1, 3, 64, 64) and 0 <= hint.min() and hint.max() <= 1
    column = hint[0, 0].mean(0)
    assert column[28:36].mean() > 0.9 and column[:8].mean() < 0.1


def test_bad_units_are_named_errors(pipe):
    with pytest.raises(InvalidInputError, match="start"):
        ControlNetUnit(None, None, start=0.8, end=0.2)
    with pytest.raises(InvalidInputError, match="control_mode"):
        ControlNetUnit(None, None, control_mode="loud")
    with pytest.raises(InvalidInputError, match="preprocessor"):
        pipe("a red circle", **RUN, controlnets=[ControlNetUnit(controlnet(pipe), hint_picture(), preprocess="x")])


def test_a_controlnet_file_loads_through_models_and_the_recipe_records_it(pipe, tmp_path):
    from safetensors.torch import save_file

    net = controlnet(pipe, seed=3)
    path = tmp_path / "control_shapes.safetensors"
    save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))
    unit = ControlNetUnit(str(path), hint_picture(), scale=0.7, preprocess="canny")
    out = pipe("a red circle", **RUN, controlnets=[unit])[0]
    (entry,) = out.info["diffstudio_recipe"]["extra"]["controlnets"]
    assert entry["model"] == "control_shapes.safetensors" and entry["scale"] == 0.7
    assert str(path.resolve()) in pipe.models.controlnets
    direct = pipe("a red circle", **RUN, controlnets=[ControlNetUnit(net, hint_picture(), 0.7, preprocess="canny")])
    assert np.array_equal(np.asarray(out), np.asarray(direct[0]))


def test_the_command_line_takes_control_units_and_tiles(pipe, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file

    from diffstudio.cli import main
    from diffstudio.io.recipe import read_recipe

    path, picture = tmp_path / "control.safetensors", tmp_path / "edges.png"
    save_file({f"control_model.{k}": v.contiguous() for k, v in controlnet(pipe).state_dict().items()}, str(path))
    Image.fromarray(hint_picture()).save(picture)
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--steps", "2", "-o", str(out), "--tile-size", "64",
                 "--control", f"canny:{path}:{picture}:0.5", "--control", f"{path}:{picture}"]) == 0
    recipe = read_recipe(out)
    units = recipe["extra"]["controlnets"]
    assert [(u["scale"], u.get("preprocess")) for u in units] == [(0.5, "canny"), (1.0, None)]
    assert recipe["extra"]["tiled_diffusion"]["tile"] == [64, 64]
    assert main(["generate", "x", "--control", f"{path}", "-o", str(tmp_path / "bad.png")]) == 2
    assert "expected [PREPROCESS:]FILE:IMAGE" in capsys.readouterr().err
    assert main(["generate", "x", "--control", f"{tmp_path / 'none.pth'}:{picture}", "-o", str(out)]) == 2
    assert "ControlNet file" in capsys.readouterr().err
