"""The SDXL ControlNet-Union (xinsir's controlnet-union-sdxl-1.0 and ProMax): parity with diffusers'
ControlNetUnionModel at a tiny random SDXL config (one control image, and two fused in one call), the released
layout at full size on the meta device, detection and loading, the pipeline's ``mode`` and its named errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffstudio.convert.controlnet import controlnet_from_diffusers, controlnet_to_diffusers
from diffstudio.detect import detect
from diffstudio.detect.controlnet import controlnet_config_from_diffusers, derive_controlnet_config
from diffstudio.errors import InvalidInputError
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
from diffstudio.models.controlnet_union import UNION_MODES
from diffstudio.release_configs import SDXL_UNET
from tests.tiny_controlnet import HINTS, controlnet_config, inputs, rel_err
from tests.tiny_sd15 import randomise


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_union(types: int = 6, seed: int = 0):
    """diffusers ControlNetUnionModel at the tiny SDXL encoder (base width 32), 2 condition heads, random weights."""
    from diffusers import ControlNetUnionModel

    config = controlnet_config("sdxl")
    width = config["block_out_channels"][0]
    model = ControlNetUnionModel(**config, num_control_type=types, num_trans_channel=width, num_proj_channel=width,
                                 num_trans_head=2)
    randomise(model, seed)
    with torch.no_grad():  # gain ~1 through the hint encoder, and condition tokens of the features' size
        for name, p in model.controlnet_cond_embedding.named_parameters():
            p.mul_(3.0 if name.endswith("weight") else 0.1)
        model.task_embedding.normal_(0, 1)
    return model.eval()


def ours_from(reference) -> ControlNetModel:
    sd = controlnet_from_diffusers(reference.state_dict())
    model = ControlNetModel(derive_controlnet_config(sd, {**HINTS["sdxl"], "union_heads": 2}))
    model.load_state_dict(sd)
    return model.eval()


def _reference_call(reference, args, their_kwargs, hints, modes, scale):
    x, _, t, context = args
    onehot = torch.zeros(x.shape[0], reference.config.num_control_type)
    onehot[:, modes] = 1.0
    with torch.no_grad():
        down, mid = reference(x, t, context, controlnet_cond=hints, control_type=onehot, control_type_idx=modes,
                              conditioning_scale=scale, return_dict=False, **their_kwargs)
    return [*down, mid]


def test_one_control_image_matches_diffusers():
    reference = reference_union()
    ours = ours_from(reference)
    args, theirs, mine = inputs("sdxl")
    expected = _reference_call(reference, args, theirs, [args[1]], [3], 1.0)
    with torch.no_grad():
        got = ours(*args, mode="canny", **mine)
        other = ours(*args, mode="depth", **mine)
    assert len(got) == len(expected) == 7  # conv_in, 3 levels of 1 ResBlock, 2 Downsamples; the middle
    assert max(rel_err(a, b) for a, b in zip(got, expected)) < 1e-4
    assert min(rel_err(a, b) for a, b in zip(other, expected)) > 1e-3  # the mode matters


def test_two_control_images_fused_in_one_call_match_diffusers():
    reference = reference_union(types=8, seed=3)
    ours = ours_from(reference)
    args, theirs, mine = inputs("sdxl")
    second = torch.rand_like(args[1])
    expected = _reference_call(reference, args, theirs, [args[1], second], [1, 6], [0.7, 0.4])
    with torch.no_grad():
        got = ours(args[0], [args[1], second], *args[2:], mode=["depth", "tile"], scales=[0.7, 0.4], **mine)
    assert max(rel_err(a, b) for a, b in zip(got, expected)) < 1e-4


def test_the_diffusers_layout_round_trips_and_its_config_reads():
    reference = reference_union()
    sd = reference.state_dict()
    ours = controlnet_from_diffusers(sd)
    assert {"task_embedding", "spatial_ch_projs.weight", "control_add_embedding.linear_1.weight",
            "transformer_layes.0.attn.in_proj_weight"} <= set(ours)
    config = controlnet_config_from_diffusers({**dict(reference.config), "_class_name": "ControlNetUnionModel"})
    assert (config.num_control_types, config.union_heads, config.union_layers, config.control_type_dim) == (6, 2, 1, 8)
    back = controlnet_to_diffusers(ours, config)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


# --- the released layout at full size ----------------------------------------------------------------------------

def meta_reference(types: int):
    """diffusers ControlNetUnionModel at the released SDXL UNet's encoder (diffstudio.release_configs.SDXL_UNET) with
    diffusers' union defaults (320-wide condition tokens, 8 heads, 1 block, hint widths 48, 96, 192, 384 unless the
    UNet config names them), ``num_control_type`` 6 (controlnet-union-sdxl-1.0) or 8 (ProMax); the meta device."""
    from diffusers import ControlNetUnionModel

    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    config = {k: v for k, v in SDXL_UNET.items() if k in accepted}
    with torch.device("meta"):
        return ControlNetUnionModel(**config, num_control_type=types)


@pytest.mark.parametrize("types, variant", [(6, "ControlNet-Union, 6 control types"),
                                            (8, "ControlNet-Union ProMax, 8 control types")])
def test_the_released_layout_converts_and_is_detected(types, variant):
    reference = meta_reference(types)
    sd = reference.state_dict()
    ours = controlnet_from_diffusers(sd)
    config = controlnet_config_from_diffusers({**dict(reference.config), "_class_name": "ControlNetUnionModel"})
    with torch.device("meta"):
        built = ControlNetModel(config).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in built.items()}
    assert tuple(ours["task_embedding"].shape) == (types, 320)
    assert tuple(ours["control_add_embedding.linear_1.weight"].shape) == (1280, 256 * types)
    det = detect(sd)  # the released single file: diffusers names, bare keys
    component = det.components["controlnet"]
    assert (det.family, det.variant, component.layout) == ("sdxl", variant, "diffusers")
    assert component.config == config
    assert "ProMax" in det.summary() if types == 8 else "ProMax" not in det.summary()


# --- the pipeline ------------------------------------------------------------------------------------------------

RUN = dict(width=64, height=64, steps=2, seed=3, cfg_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    import diffstudio
    from tests import tiny_sdxl

    folder = tiny_sdxl.write_diffusers_folder(tmp_path_factory.mktemp("xl") / "xl", tiny_sdxl.reference_models())
    return diffstudio.Pipeline(diffstudio.load(str(folder)))


def union_for(pipe, zero: bool = False, seed: int = 0) -> ControlNetModel:
    unet = pipe.models.configs["unet"]
    config = ControlNetConfig.from_unet(unet, hint_block_channels=[16, 32, 32, 32], num_control_types=8,
                                        union_heads=2, control_type_dim=8)
    torch.manual_seed(seed)
    model = ControlNetModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name or "spatial_ch_projs" in name:
                p.zero_() if zero else p.normal_(0, 0.3)
    return model


def picture() -> np.ndarray:
    image = np.full((64, 64, 3), 255, np.uint8)
    image[16:48, 8:30] = 0
    return image


def generate(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe("a red circle", **RUN, **kwargs)[0], dtype=np.int16)


def test_a_union_unit_steers_the_image_by_its_mode(xl):
    from diffstudio.pipeline.control import ControlNetUnit

    base = generate(xl)
    union = union_for(xl)
    canny = generate(xl, controlnets=[ControlNetUnit(union, picture(), mode="canny")])
    depth = generate(xl, controlnets=[ControlNetUnit(union, picture(), mode="depth")])
    assert np.abs(canny - base).max() > 0 and np.abs(depth - canny).max() > 0
    # with_mode is the same as the unit's mode; a list of modes fuses one image per mode
    assert np.array_equal(generate(xl, controlnets=[ControlNetUnit(union.with_mode(3), picture())]), canny)
    both = generate(xl, controlnets=[ControlNetUnit(union, [picture(), picture()[::-1]], mode=["canny", "depth"])])
    assert np.abs(both - canny).max() > 0
    listed = ControlNetUnit(union, [picture()], mode=["canny"], scale=0.5)  # a list of one is the plain unit
    assert np.array_equal(generate(xl, controlnets=[listed]),
                          generate(xl, controlnets=[ControlNetUnit(union, picture(), mode="canny", scale=0.5)]))
    zero = ControlNetUnit(union_for(xl, zero=True), picture(), mode="tile")
    assert np.array_equal(generate(xl, controlnets=[zero]), base)


def test_the_recipe_records_the_mode(xl):
    from diffstudio.pipeline.control import ControlNets, ControlNetUnit

    recipe = ControlNets([ControlNetUnit(union_for(xl), picture(), mode="canny")]).recipe()
    assert recipe["controlnets"][0]["mode"] == "canny"
    json.dumps(recipe)


def test_mode_errors_are_named(xl):
    from diffstudio.pipeline.control import ControlNetUnit

    union = union_for(xl)
    with pytest.raises(InvalidInputError, match="openpose 0.*canny/lineart/anime_lineart/mlsd 3"):
        generate(xl, controlnets=[ControlNetUnit(union, picture())])
    with pytest.raises(InvalidInputError, match="unknown ControlNet-Union mode 'sketchy'"):
        generate(xl, controlnets=[ControlNetUnit(union, picture(), mode="sketchy")])
    six = ControlNetModel(ControlNetConfig.from_dict({**union.config.to_dict(), "num_control_types": 6}))
    with pytest.raises(InvalidInputError, match="ProMax"):
        six.with_mode("tile")
    plain = ControlNetModel(ControlNetConfig.from_unet(xl.models.configs["unet"], hint_block_channels=[16, 32, 32, 32]))
    with pytest.raises(InvalidInputError, match="has no modes"):
        generate(xl, controlnets=[ControlNetUnit(plain, picture(), mode="canny")])
    with pytest.raises(InvalidInputError, match="one per mode"):
        ControlNetUnit(union, picture(), mode=["canny", "depth"])
    assert UNION_MODES["scribble"] == 2 and UNION_MODES["inpaint"] == 7


# --- loading: the released files' forms, diffstudio info, the command line ----------------------------------------

def released_like(folder, types: int = 8):
    """A ControlNetUnionModel for the tiny SDXL base, written as xinsir's repositories hold it: a diffusers folder
    (config.json with ``_class_name: ControlNetUnionModel`` + diffusion_pytorch_model.safetensors)."""
    from diffusers import ControlNetUnionModel

    from tests.tiny_sdxl import UNET_BASE

    config = {k: v for k, v in UNET_BASE.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    width = config["block_out_channels"][0]
    model = ControlNetUnionModel(**config, conditioning_embedding_out_channels=(16, 32, 32, 32), num_control_type=types,
                                 num_trans_channel=width, num_proj_channel=width, num_trans_head=8)
    randomise(model, 5)
    model.save_pretrained(str(folder))
    return folder


def test_released_files_load_through_models_and_the_command_line(xl, tmp_path, capsys):
    from PIL import Image

    from diffstudio.cli import main
    from diffstudio.io.recipe import read_recipe

    folder = released_like(tmp_path / "union-promax")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    from_folder = xl.models.add_controlnet(folder)
    single = xl.models.add_controlnet(folder / "diffusion_pytorch_model.safetensors")  # the lone file: from shapes
    assert from_folder.config == single.config and from_folder.config.num_control_types == 8
    # a lone file's condition heads are xinsir's 8 (shapes cannot tell); its Fourier width is the base's TIME_DIM
    assert (single.config.union_heads, single.config.control_type_dim) == (8, 8)
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), single.state_dict().values()))
    assert main(["info", str(folder)]) == 0
    assert "ControlNet-Union ProMax, 8 control types" in capsys.readouterr().out

    picture_path = tmp_path / "depth.png"
    Image.fromarray(picture()).save(picture_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "out.png"
    base = str(Path(xl.models.sources["unet"]).parent)
    assert main(["generate", "a red circle", "--model", base, "--steps", "1", "--width", "64", "--height", "64",
                 "-o", str(out), "--control", f"depth:{path}:{picture_path}:0.5"]) == 0
    unit = read_recipe(out)["extra"]["controlnets"][0]
    assert (unit["mode"], unit["scale"], unit.get("preprocess")) == ("depth", 0.5, None)


def test_the_http_api_takes_a_mode():
    from diffstudio.server.v1 import ControlNetSpec

    assert ControlNetSpec(model="union", image="x", mode="depth").mode == "depth"
    assert ControlNetSpec(model="edges", image="x").mode is None


def test_the_repaint_hint_is_the_image_with_the_masked_pixels_black():
    from diffstudio.control import annotators

    image, mask = np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    hint = annotators.inpaint(image, mask, fill=0.0)
    assert hint[..., 4:8, 4:8].abs().max() == 0 and torch.allclose(hint[..., 0, 0], torch.tensor(200 / 255))
