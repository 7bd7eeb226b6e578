"""Winograd F(4x4, 3x3) convolutions (diffstudio/models/winograd.py) against torch's direct convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffstudio.models import winograd
from diffstudio.models.winograd import WinogradConv2d, transform_weight, use_winograd, winograd_conv3x3


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 16, 13, 7), (1, 8, 4, 4), (3, 5, 1, 9), (1, 4, 21, 30)])
def test_in_float64_it_is_the_convolution_exactly(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, shape[1], 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    want = F.conv2d(x, weight, bias, padding=1)
    got = winograd_conv3x3(x, transform_weight(weight), bias)
    assert got.shape == want.shape and relative(got, want) < 1e-13


def test_in_float32_the_error_stays_near_a_direct_convolution():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 24, 24, generator=gen)
    weight = torch.randn(32, 64, 3, 3, generator=gen) / 24
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    direct, fast = F.conv2d(x, weight, padding=1), winograd_conv3x3(x, transform_weight(weight))
    assert relative(direct, exact) < 1e-6
    assert relative(fast, exact) < 1e-5  # measured about 2e-6: the transforms' values reach 100x the input's


def test_large_maps_are_done_in_bands_with_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 37, 22, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 8, 3, 3, generator=gen, dtype=torch.float64)
    whole = winograd_conv3x3(x, transform_weight(weight))
    monkeypatch.setattr(winograd, "BAND_COLUMNS", 20)  # 2 pictures x 6 tiles a row: one tile row per band
    banded = winograd_conv3x3(x, transform_weight(weight))
    assert banded.shape == whole.shape and relative(banded, F.conv2d(x, weight, padding=1)) < 1e-13


@pytest.fixture
def every_size(monkeypatch):
    """Winograd for convolutions of any size (the thresholds keep small ones on torch's kernel)."""
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_MACS", 0)


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=2,
                                                                                                 dilation=2))


def test_use_winograd_switches_only_the_3x3_stride_1_convolutions_and_back(every_size):
    net, x = network().eval(), torch.randn(2, 4, 20, 20)
    with torch.no_grad():
        want = net(x)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        assert use_winograd(net) == 2
        assert [type(m) is WinogradConv2d for m in net if isinstance(m, nn.Conv2d)] == [True, True, False, False,
                                                                                      False]
        got = net(x)
        assert relative(got, want) < 1e-5 and not torch.equal(got, want)  # Winograd arithmetic, not the kernel
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
        assert use_winograd(net, enabled=False) == 2
        assert torch.equal(net(x), want)


def test_a_weight_changed_in_place_is_transformed_again(every_size):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    use_winograd(conv)
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        conv(x)
        assert "_winograd_kernels" in conv.__dict__
        conv.weight.mul_(2)  # what merging a LoRA does
        assert relative(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5


def test_wide_layers_are_left_to_torch_unless_asked(every_size, monkeypatch):
    monkeypatch.setattr(winograd, "NARROW_KERNELS", 8 * 8)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        use_winograd(conv)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        use_winograd(conv, wide=True)
        got = conv(x)
        assert not torch.equal(got, F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert relative(got, F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5


def test_training_bf16_and_small_convolutions_use_the_direct_kernel(monkeypatch):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    use_winograd(conv)
    x = torch.randn(1, 8, 12, 12)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))  # 8 channels: below the threshold
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_MACS", 0)
    y = conv(x)  # grad enabled and the weight requires it: the direct kernel, so the weight's gradient is exact
    assert torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
    y.sum().backward()
    assert conv.weight.grad is not None
    half = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    use_winograd(half)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(xb), F.conv2d(xb, half.weight, half.bias, padding=1))


def test_models_winograd_covers_the_denoiser_vae_and_controlnets_added_later(every_size, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    import diffstudio
    from diffstudio.pipeline.control import ControlNetUnit
    from tests.server_fixtures import controlnet_state_dict, picture

    models = diffstudio.load()
    pipe = diffstudio.Pipeline(models)
    run = {"steps": 2, "seed": 3, "progress": False}
    path = tmp_path / "edges.safetensors"
    save_file(controlnet_state_dict(models), str(path))
    unit = ControlNetUnit(str(path), picture(4), scale=0.8)
    want = np.asarray(pipe("a red circle", controlnets=[unit], **run)[0], dtype=np.int16)
    models.controlnets.clear()
    models.winograd()
    assert any(type(m) is WinogradConv2d for m in models.unet.modules())
    assert any(type(m) is WinogradConv2d for m in models.vae.modules())
    got = np.asarray(pipe("a red circle", controlnets=[unit], **run)[0], dtype=np.int16)
    assert any(type(m) is WinogradConv2d for m in next(iter(models.controlnets.values())).modules())
    assert np.abs(got - want).max() <= 2  # 8-bit levels: fp32 rounding differences only
    models.winograd(False)
    assert not any(type(m) is WinogradConv2d for m in models.unet.modules())


def test_generate_takes_winograd(tmp_path):
    from diffstudio.cli import build_parser, main

    assert build_parser().parse_args(["generate", "x", "--winograd"]).winograd == "on"
    assert build_parser().parse_args(["generate", "x", "--winograd", "wide"]).winograd == "wide"
    out = tmp_path / "w.png"
    assert main(["generate", "a red circle", "--steps", "1", "--winograd", "-o", str(out)]) == 0 and out.exists()


def test_the_video_commands_take_winograd(tmp_path, monkeypatch):
    from diffstudio.cli import build_parser, main
    from diffstudio.loader import Models
    from diffstudio.video import video_io
    from tests.test_video_pipeline_cli import write_motion_module

    switched = []
    original = Models.winograd
    monkeypatch.setattr(Models, "winograd", lambda self, *a, **k: switched.append(k) or original(self, *a, **k))
    assert build_parser().parse_args(["img2vid", "x.png", "--model", "m", "--winograd", "wide"]).winograd == "wide"
    out = tmp_path / "out.mp4"
    motion = write_motion_module(tmp_path / "mm.safetensors")
    assert main(["video", "a red circle moving to the right", "--motion", motion, "--frames", "4", "--steps", "1",
                 "--context-length", "4", "--winograd", "-o", str(out), "--quiet"]) == 0
    assert switched == [{"wide": False}] and len(video_io.read_frames(str(out))) == 4
