"""Diffutoon's wiring on the untrained demo model with tiny random motion modules and ControlNets: the DDIM
timesteps and linear betas against diffusers' DDIMScheduler, what each ControlNet is fed (lineart from the input,
the tile ControlNet fed stage 1's video), the number of UNet calls, bit-for-bit repeats, and the named errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffstudio.control import annotators
from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.families.sd15 import SD15
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
from diffstudio.models.motion import MotionConfig, MotionModules
from diffstudio.sampling.schedules import model_sigmas, normal, sigma_to_t
from diffstudio.video.context import context_windows
from diffstudio.video.diffutoon import (
    DiffutoonSetupError,
    MissingDepthError,
    WindowTooLongError,
    ddim_sigmas,
    ddim_timesteps,
    resolve_smoother,
    round_size,
    toon_shade,
)

FAST = dict(steps=2, edit_steps=2, smoother=None, edit_smoother=None, progress=False)


@pytest.fixture(scope="module")
def models():
    base = untrained_demo_models()
    unet = base.configs["unet"]
    config = MotionConfig(level_channels=[m * unet.model_channels for m in unet.channel_mult],
                          modules_per_level=list(unet.num_res_blocks), max_frames=8)
    torch.manual_seed(0)
    motion = MotionModules(config).eval()
    with torch.no_grad():  # not the identity: proj_out away from zero
        for p in motion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    twin = base.clone()
    twin.components["motion"], twin.configs["motion"] = motion, config
    twin.sources["motion"] = "tiny-motion"
    return twin


def controlnet(models, seed: int) -> ControlNetModel:
    config = ControlNetConfig.from_unet(models.configs["unet"], hint_block_channels=[16, 32, 32, 32])
    torch.manual_seed(seed)
    net = ControlNetModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name:
                p.normal_(0, 0.3)
    return net


def moving_square(frames: int = 6, size: int = 128) -> list[np.ndarray]:
    clip = []
    for i in range(frames):
        picture = np.full((size, size, 3), 230, np.uint8)
        picture[30:70, 10 + 6 * i:50 + 6 * i] = (200, 30, 30)
        clip.append(picture)
    return clip


def recorder(net) -> list:
    """The hints a ControlNet is called with, one (rows, 3, H, W) tensor per call."""
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(args[1].detach().float().cpu().clone()))
    return seen


def hint_of(picture, size) -> torch.Tensor:
    return annotators.hint_tensor(Image.fromarray(np.asarray(picture)).resize(size, Image.LANCZOS))


# ------------------------------------------------------------------------------------------------ schedule


def test_ddim_timesteps_and_linear_betas_match_diffusers_ddim():
    from diffusers import DDIMScheduler

    assert ddim_timesteps(10) == [999 - 111 * i for i in range(10)]
    reference = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                              timestep_spacing="linspace")
    reference.set_timesteps(10)
    assert reference.timesteps.tolist() == ddim_timesteps(10)
    # AnimateDiff's linear betas: our sigmas at those timesteps are sqrt((1 - abar) / abar) of diffusers' abar.
    family = SD15.for_motion()
    sigmas = ddim_sigmas(family, 10)
    abar = reference.alphas_cumprod[reference.timesteps].double()
    expected = ((1 - abar) / abar).sqrt()
    assert torch.allclose(sigmas[:-1].double(), expected, rtol=1e-4) and sigmas[-1] == 0
    assert family.schedule.kind == "linear" and (family.schedule.beta_start, family.schedule.beta_end) == (0.00085,
                                                                                                         0.012)
    # Our "normal" schedule gives the same ten timesteps.
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    table = model_sigmas(betas)
    assert torch.allclose(normal(table, 10).double(), sigmas.double(), rtol=1e-4)
    assert torch.allclose(sigma_to_t(sigmas[:-1], table), torch.tensor(ddim_timesteps(10), dtype=torch.float64),
                          atol=1e-3)
    # Strength 0.9 (stage 1): 20 steps from timestep 899 down to 0, as DiffSynth-Studio's scheduler.
    assert ddim_timesteps(20, 0.9)[0] == 899 and ddim_timesteps(20, 0.9)[-1] == 0 and len(ddim_timesteps(20, 0.9)) == 20


def test_sizes_round_to_multiples_of_64_and_presets_resolve():
    assert [round_size(v) for v in (10, 500, 540, 1080, 1920)] == [64, 512, 512, 1088, 1920]
    smoother, steps = resolve_smoother("accurate", None, 10)
    assert steps == (4, 9) and smoother.mode == "accurate" and smoother.window_size == 30
    assert smoother.batch_size == 64 and smoother.tracking_window_size > 0
    smoother, steps = resolve_smoother("fast", None, 10)
    assert steps == (-1,) and smoother.mode == "fast" and smoother.window_size == 60
    assert resolve_smoother("accurate", None, 3)[1] == (2,)  # a shorter run smooths its last step


# ------------------------------------------------------------------------------------------------ wiring


def test_the_editing_depth_can_be_an_annotator_by_name(models, tmp_path, monkeypatch):
    clip = moving_square()
    calls = []

    def midas(picture, *args, **options):  # stands in for controlnet-aux's MiDaS (docs/controlnet.md)
        calls.append(picture.size)
        return picture.convert("L").convert("RGB")

    monkeypatch.setattr(annotators, "depth", midas)
    net, tile_net, depth_net = (controlnet(models, s) for s in range(3))
    toon_shade(models, clip, "a red square", edit_prompt="a blue square", lineart_controlnet=net,
               tile_controlnet=tile_net, edit_depth_controlnet=depth_net, edit_depth="depth", edit_size=64,
               context_length=4, context_stride=2, edit_context_length=4, edit_context_stride=2, work_dir=tmp_path,
               **FAST)
    assert calls == [(64, 64)] * len(clip)


def test_lineart_comes_from_the_input_and_the_tile_net_gets_stage_one(models, tmp_path):
    clip = moving_square()
    lineart_net, tile_net, softedge_net, depth_net = (controlnet(models, s) for s in range(4))
    fed = {name: recorder(net) for name, net in
           (("lineart", lineart_net), ("tile", tile_net), ("softedge", softedge_net), ("depth", depth_net))}
    depth_calls = []

    def depth(picture):
        depth_calls.append(picture.size)
        return picture.convert("L").convert("RGB")

    toon_shade(models, clip, "a red square", edit_prompt="a blue square", lineart_controlnet=lineart_net,
               tile_controlnet=tile_net, edit_softedge_controlnet=softedge_net, edit_depth_controlnet=depth_net,
               edit_depth=depth, edit_size=64, context_length=4, context_stride=2, edit_context_length=4,
               edit_context_stride=2, work_dir=tmp_path, **FAST)
    frames, size = len(clip), (128, 128)
    windows = context_windows(frames, 4, 2)
    # stage 2: the lineart ControlNet sees the annotator on the input frames, window by window (CFG: twice).
    for call, window in zip(fed["lineart"], windows * 2):
        expected = torch.cat([hint_of(annotators.lineart(clip[i]), size) for i in window])
        assert torch.allclose(call, expected.repeat(2, 1, 1, 1), atol=1 / 255)
    # stage 2: the tile ControlNet sees stage 1's frames (written to the work folder), not the input.
    stage_one = sorted((tmp_path / "stage1").glob("*.png"))
    assert len(stage_one) == frames
    tile_expected = torch.cat([hint_of(Image.open(stage_one[i]).convert("RGB"), size) for i in windows[0]])
    assert torch.allclose(fed["tile"][0], tile_expected.repeat(2, 1, 1, 1), atol=2 / 255)
    input_hints = torch.cat([hint_of(clip[i], size) for i in windows[0]])
    assert (fed["tile"][0][: len(windows[0])] - input_hints).abs().max() > 0.1
    # stage 1 ran at 64x64 on softedge of the (downsized) input and the user's depth callable.
    assert fed["softedge"][0].shape[-2:] == (64, 64) and fed["depth"][0].shape[-2:] == (64, 64)
    small = [np.asarray(Image.fromarray(f).resize((64, 64), Image.LANCZOS)) for f in clip]
    expected = torch.cat([annotators.hint_tensor(annotators.softedge(small[i])) for i in windows[0]])
    assert torch.allclose(fed["softedge"][0][: len(windows[0])], expected, atol=1 / 255)
    assert depth_calls == [(64, 64)] * frames  # once per frame, not once per window and step
    # stage 2 (motion on) and stage 1 (frame-wise, the editing settings) each called the ControlNets
    # steps x windows times (CFG stacks both halves into one call).
    assert len(fed["lineart"]) == len(fed["tile"]) == 2 * len(windows)
    assert len(fed["softedge"]) == 2 * len(windows)


def test_unet_calls_are_two_per_step_and_window_with_cfg(models):
    clip = moving_square(10, 64)
    rows = []
    handle = models.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        toon_shade(models, clip, "a red square", lineart_controlnet=controlnet(models, 0), context_length=4,
                   context_stride=2, **FAST)
    finally:
        handle.remove()
    windows = len(context_windows(10, 4, 2))
    assert windows == 4
    # One network call per window and step, each holding the window's conditional and unconditional rows:
    # 2 x steps x windows passes of a window through the UNet.
    assert len(rows) == FAST["steps"] * windows
    assert sum(r // 4 for r in rows) == 2 * FAST["steps"] * windows and set(rows) == {8}


def test_same_seed_repeats_bit_for_bit_and_another_differs(models):
    clip = moving_square(5, 64)
    net = controlnet(models, 0)

    def run(seed):
        frames = toon_shade(models, clip, "a red square", lineart_controlnet=net, tile_controlnet=controlnet(models, 1),
                            context_length=4, context_stride=2, seed=seed, **FAST)
        return np.stack([np.asarray(f) for f in frames])

    first = run(3)
    assert np.array_equal(first, run(3))
    assert not np.array_equal(first, run(4))


def test_resuming_from_the_work_folder_equals_a_fresh_render(models, tmp_path):
    clip = moving_square(5, 64)
    net = controlnet(models, 0)
    kwargs = dict(lineart_controlnet=net, context_length=4, context_stride=2, seed=1, **FAST)
    fresh = toon_shade(models, clip, "a red square", **kwargs)
    toon_shade(models, clip, "a red square", work_dir=tmp_path, **kwargs)
    again = toon_shade(models, clip, "a red square", work_dir=tmp_path, **kwargs)  # from the finished state
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fresh, again))


def test_named_errors(models, tmp_path):
    clip = moving_square(3, 64)
    net = controlnet(models, 0)
    with pytest.raises(WindowTooLongError, match="8 frame positions"):
        toon_shade(models, clip, "x", lineart_controlnet=net, context_length=16, work_dir=tmp_path / "w", **FAST)
    assert not (tmp_path / "w").exists()  # refused before any work
    fast = {**FAST, "context_length": 4}
    with pytest.raises(MissingDepthError, match="edit_depth"):
        toon_shade(models, clip, "x", edit_prompt="y", lineart_controlnet=net, tile_controlnet=net,
                   edit_depth_controlnet=net, **fast)
    with pytest.raises(DiffutoonSetupError, match="tile"):
        toon_shade(models, clip, "x", edit_prompt="y", lineart_controlnet=net, **fast)
    with pytest.raises(DiffutoonSetupError, match="lineart"):
        toon_shade(models, clip, "x", **fast)
    frame_wise = models.clone()
    frame_wise.components.pop("motion")
    with pytest.raises(DiffutoonSetupError, match="motion module"):
        toon_shade(frame_wise, clip, "x", lineart_controlnet=net, **fast)


def test_dry_run_plans_without_rendering(models):
    clip = moving_square(20, 100)
    calls = []
    handle = models.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        plan = toon_shade(models, clip, "x", lineart_controlnet=controlnet(models, 0), context_length=8,
                          context_stride=4, start=2, end=18, dry_run=True, **FAST)
    finally:
        handle.remove()
    assert not calls
    assert plan.frames == 16 and plan.stages[0].windows == len(context_windows(16, 8, 4))
    assert (plan.stages[0].width, plan.stages[0].height) == (128, 128)  # 100 rounds to 128
    assert plan.memory_gib > plan.weights_gib > 0
    assert "estimate" in plan.describe()
