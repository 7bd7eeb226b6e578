"""add_controlnet: every file layout a ControlNet comes in loads onto a model, matches diffusers, takes the model's
dtype, and a ControlNet that does not fit the model is a named error. `diffstudio info` names ControlNets."""

from __future__ import annotations

import pytest
import torch

import diffstudio
from diffstudio.controlnet_loading import add_controlnet
from diffstudio.convert.controlnet import controlnet_from_diffusers
from diffstudio.errors import ControlNetMismatchError, UnknownModelError
from diffstudio.models.controlnet import ControlNetModel
from tests import tiny_sd15
from tests.tiny_controlnet import reference_controlnet, rel_err

# The ControlNet of tiny_sd15's UNet (its encoder's config; the hint encoder at the released widths).
FITTING = {k: v for k, v in tiny_sd15.UNET.items() if k not in ("up_block_types", "sample_size", "out_channels")}


def fitting_reference(seed: int = 5, **overrides):
    return reference_controlnet("sd15", seed, **{**FITTING, "conditioning_embedding_out_channels": (16, 32, 96, 256),
                                                 **overrides})


def save(path, sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_sd15.write_single_file(tmp_path_factory.mktemp("base") / "sd15.safetensors",
                                       *tiny_sd15.reference_models())
    return diffstudio.load(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fitting ControlNet in every layout: cldm .safetensors (bare), cldm .pth (under control_model.),
    a diffusers single file, a diffusers folder."""
    root = tmp_path_factory.mktemp("controlnets")
    ref = fitting_reference()
    cldm = controlnet_from_diffusers(ref.state_dict())
    torch.save({"control_model." + k: v for k, v in cldm.items()}, root / "control_tiny.pth")
    ref.save_pretrained(root / "diffusers_folder")
    return ref, {"cldm": save(root / "control_tiny.safetensors", cldm), "pth": root / "control_tiny.pth",
                 "diffusers_file": save(root / "diffusers.safetensors", ref.state_dict()),
                 "diffusers_folder": root / "diffusers_folder"}


def residual_errors(ours: ControlNetModel, ref) -> list[float]:
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 600.0])
    hint = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), scale_factor=8, mode="bilinear")
    ctx = torch.randn(2, 77, FITTING["cross_attention_dim"], generator=g)
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, return_dict=False)
        got = ours(x.to(ours.dtype), hint, t, ctx)
    return [rel_err(a, b) for a, b in zip(got, [*down, mid], strict=True)]


@pytest.mark.parametrize("layout", ["cldm", "pth", "diffusers_file", "diffusers_folder"])
def test_every_layout_loads_and_matches_diffusers(models, files, layout):
    ref, paths = files
    controlnet = add_controlnet(models, paths[layout])
    assert isinstance(controlnet, ControlNetModel) and not controlnet.training
    assert controlnet.dtype == models.dtype and next(controlnet.parameters()).device == models.device
    assert max(residual_errors(controlnet, ref)) < 1e-4
    # The residuals land on the UNet's skips.
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        control = controlnet(x, torch.rand(1, 3, 64, 64, generator=g), torch.tensor([500.0]), ctx)
        assert models.unet(x, torch.tensor([500.0]), ctx, control=control).shape == x.shape


def test_takes_the_models_dtype(files, tmp_path):
    ref, paths = files
    path = tiny_sd15.write_single_file(tmp_path / "sd15.safetensors", *tiny_sd15.reference_models())
    low = diffstudio.load(path, dtype=torch.bfloat16)
    controlnet = add_controlnet(low, paths["cldm"])
    assert controlnet.dtype == torch.bfloat16
    assert max(residual_errors(controlnet, ref)) < 5e-2  # bf16 rounding, not a wrong weight


@pytest.mark.parametrize("overrides,message", [
    ({"cross_attention_dim": 32}, "text width"),
    ({"block_out_channels": (32, 96)}, "encoder widths"),
])
def test_a_controlnet_for_another_unet_is_refused(models, tmp_path, overrides, message):
    sd = controlnet_from_diffusers(fitting_reference(**overrides).state_dict())
    with pytest.raises(ControlNetMismatchError, match=message):
        add_controlnet(models, save(tmp_path / "other.safetensors", sd))


def test_a_controlnet_for_another_family_is_refused(models, tmp_path):
    sd = controlnet_from_diffusers(reference_controlnet("sdxl").state_dict())
    with pytest.raises(ControlNetMismatchError, match="for sdxl models"):
        add_controlnet(models, save(tmp_path / "xl.safetensors", sd))


def test_a_file_without_a_controlnet_is_a_named_error(models):
    with pytest.raises(UnknownModelError, match="holds no ControlNet"):
        add_controlnet(models, models.sources["unet"])


def test_load_refuses_a_controlnet_as_a_model(files):
    _, paths = files
    with pytest.raises(UnknownModelError, match="is a ControlNet for sd15"):
        diffstudio.load(paths["cldm"])


@pytest.mark.parametrize("layout", ["pth", "diffusers_folder"])
def test_info_names_a_controlnet_and_its_family(files, layout, capsys):
    from diffstudio.cli import main

    _, paths = files
    assert main(["info", str(paths[layout])]) == 0
    out = capsys.readouterr().out
    assert "family: sd15" in out and "controlnet" in out
