"""The AnimateDiff video pipeline on the untrained demo model with tiny motion modules: context windows are
exact for a frame-wise network, window layouts agree while the motion modules are zero, seeds repeat, a
frame's noise does not depend on the layout, a resumed render equals an uninterrupted one, per-frame ControlNet
images pick their rows, and the family's motion schedule is used while a motion module is loaded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.models.motion import MotionConfig, MotionModules
from diffstudio.pipeline.generate import Pipeline
from diffstudio.pipeline.guidance import CFGDenoiser
from diffstudio.pipeline.request import Request
from diffstudio.sampling.noise import SeededNoise
from diffstudio.video.animatediff import ContextWindows, Frames, VideoStart
from diffstudio.video.render import VideoPipeline, frame_noise
from diffstudio.video.workdir import StaleRenderError, UnresumableSamplerError

RUN = dict(steps=3, cfg_scale=3.0, seed=7, progress=False)


def motion_modules(models, scale: float | None = None, seed: int = 0, max_frames: int = 32) -> MotionModules:
    """Motion modules that fit the demo UNet: fresh (proj_out zero: the identity) or with every weight
    perturbed by ``scale``."""
    unet = models.configs["unet"]
    config = MotionConfig(level_channels=[m * unet.model_channels for m in unet.channel_mult],
                          modules_per_level=list(unet.num_res_blocks), max_frames=max_frames)
    torch.manual_seed(seed)
    modules = MotionModules(config).eval()
    if scale is not None:
        with torch.no_grad():
            for p in modules.parameters():
                p.add_(torch.randn_like(p) * scale)
    return modules


def with_motion(models, modules):
    twin = models.clone()
    twin.components["motion"], twin.configs["motion"] = modules, modules.config
    twin.sources["motion"] = "tiny-motion"
    return twin


@pytest.fixture(scope="module")
def models():
    return untrained_demo_models()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def latent(pipe, prompt="a red circle", **kwargs) -> torch.Tensor:
    """The final latent of a render (F, C, h, w)."""
    seen = []
    pipe(prompt, **{**RUN, **kwargs}, callback=lambda i, n, x, d: seen.append(x.clone()))
    return seen[-1]


# ---------------------------------------------------------------------------------------------- windows


def test_framewise_denoiser_through_windows_equals_one_call(models):
    pipe = Pipeline(models)
    gen = pipe.prepare(Request("a red circle", steps=3), [Frames(None), ContextWindows(4, 2)], start=VideoStart())
    frames = 10
    x = torch.randn(frames, *gen.latent_shape) * 3
    sigma = torch.full((frames,), 3.0)
    windowed = gen.guided(x, sigma)
    # The reference: the network's denoiser on all frames at once, each conditioning row repeated per frame.
    rows = {k: v.expand(frames, *v.shape[1:]) for k, v in gen.cond.items()}
    unrows = {k: v.expand(frames, *v.shape[1:]) for k, v in gen.uncond.items()}
    whole = CFGDenoiser(gen.denoiser, rows, unrows, gen.request.cfg_scale)(x, sigma)
    assert rel_err(windowed, whole) < 1e-5


def test_window_layouts_agree_while_the_motion_modules_are_zero(models):
    frame_wise = latent(VideoPipeline(models), num_frames=10, context_length=16)
    zero = VideoPipeline(with_motion(models, motion_modules(models)))
    # The motion schedule differs from the image model's: compare zero modules with each other, then with
    # the image model on the same schedule.
    layouts = [latent(zero, num_frames=10, context_length=n, context_stride=s) for n, s in [(16, 8), (4, 2), (6, 5)]]
    for other in layouts[1:]:
        assert torch.allclose(other, layouts[0], atol=1e-4, rtol=1e-4)
    view = copy.copy(models)
    view.family = models.family.for_motion()
    same_schedule = latent(VideoPipeline(view), num_frames=10, context_length=4, context_stride=2)
    assert torch.allclose(same_schedule, layouts[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(frame_wise, layouts[0], atol=1e-3)  # the motion schedule is another schedule


def test_dilated_windows_share_noise_per_place_and_pass_sub_frame_positions(models):
    """Dilation 3: frames 3k, 3k + 1, 3k + 2 start from the noise of seed + k. While the modules are zero the
    frames are frame-wise images, so those three are one image; a nonzero module sees the sub-frame positions
    and renders them as three moments."""
    zero = VideoPipeline(with_motion(models, motion_modules(models)))
    dilated = latent(zero, num_frames=9, context_length=4, context_stride=2, context_dilation=3)
    plain = latent(zero, num_frames=3, context_length=4)  # frames seeded 7, 8, 9
    for k in range(3):
        for j in range(3):
            assert torch.allclose(dilated[3 * k + j], plain[k], atol=1e-5), (k, j)
    moving = VideoPipeline(with_motion(models, motion_modules(models, scale=0.05)))
    frames = latent(moving, num_frames=9, context_length=4, context_stride=2, context_dilation=3)
    assert all(rel_err(frames[3 * k + 1], frames[3 * k]) > 1e-4 for k in range(3))
    with pytest.raises(InvalidSizeError, match="sub-frame"):  # positions up to 3 + 2/3 need a fifth table row
        latent(VideoPipeline(with_motion(models, motion_modules(models, max_frames=4))), num_frames=8,
               context_length=4, context_dilation=2)


def test_a_nonzero_motion_module_changes_the_video(models):
    zero = latent(VideoPipeline(with_motion(models, motion_modules(models))), num_frames=8, context_length=8)
    moving = latent(VideoPipeline(with_motion(models, motion_modules(models, scale=0.05))), num_frames=8,
                    context_length=8)
    assert (moving - zero).abs().mean() > 1e-2


def test_the_motion_schedule_is_the_familys_linear_one(models):
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.video.render import motion_view

    view = motion_view(with_motion(models, motion_modules(models)))
    assert view.family.schedule.kind == "linear" and view.family.schedule.beta_end == 0.012
    assert motion_view(models).family.schedule.kind == "scaled_linear"  # no motion module: the image schedule
    # Linear betas in (0.00085, 0.012): the published AnimateDiff training schedule.
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    sigmas = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)).sqrt()
    assert torch.allclose(prediction_for(view.family).sigmas.double(), sigmas, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ noise


def test_seeds_repeat_bit_for_bit_and_differ_from_other_seeds(models):
    pipe = VideoPipeline(with_motion(models, motion_modules(models, scale=0.05)))
    kwargs = dict(num_frames=6, context_length=4, context_stride=2, sampler="euler_ancestral")
    a, b = latent(pipe, **kwargs), latent(pipe, **kwargs)
    assert torch.equal(a, b)
    assert not torch.allclose(latent(pipe, **{**kwargs, "seed": 8}), a)


def test_a_frames_noise_does_not_depend_on_the_video_or_the_windows(models):
    long, short = frame_noise(7, 10, (4, 8, 8)), frame_noise(7, 4, (4, 8, 8))
    for _ in range(3):  # the start and two later draws (ancestral steps)
        a, b = (short.initial(), long.initial()) if short.draws == 0 else (short(), long())
        assert torch.equal(a, b[:4])
    same = frame_noise(7, 5, (4, 8, 8), same_noise=True).initial()
    assert all(torch.equal(same[i], same[0]) for i in range(5))
    assert torch.equal(same[0], SeededNoise([7], (4, 8, 8)).initial()[0])
    # End to end, frame-wise with fresh noise every step: the first frames of a longer video, in other windows,
    # are the frames of a shorter one.
    pipe = VideoPipeline(models)
    first = latent(pipe, num_frames=4, context_length=4, sampler="euler_ancestral")
    longer = latent(pipe, num_frames=9, context_length=3, context_stride=2, sampler="euler_ancestral")
    assert torch.allclose(longer[:4], first, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- resume


class Stop(Exception):
    pass


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_a_resumed_render_equals_an_uninterrupted_one(models, tmp_path, sampler):
    pipe = VideoPipeline(with_motion(models, motion_modules(models, scale=0.05)))
    kwargs = dict(num_frames=6, context_length=4, context_stride=2, sampler=sampler, steps=4)
    whole = latent(pipe, **kwargs)
    frames_whole = [np.asarray(f) for f in pipe("a red circle", **{**RUN, **kwargs})]

    def stop_after_two(i, n, x, d):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe("a red circle", **{**RUN, **kwargs}, work_dir=tmp_path, callback=stop_after_two)
    steps_run = []
    frames = pipe("a red circle", **{**RUN, **kwargs}, work_dir=tmp_path,
                  callback=lambda i, n, x, d: steps_run.append((i, x.clone())))
    assert [i for i, _ in steps_run] == [2, 3]  # continued at step 2 of 4
    assert torch.equal(steps_run[-1][1], whole)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(frames, frames_whole))
    # A finished render in its work folder decodes again without sampling.
    again = []
    pipe("a red circle", **{**RUN, **kwargs}, work_dir=tmp_path, callback=lambda *a: again.append(a))
    assert again == []


def test_a_work_folder_of_other_arguments_is_refused_naming_what_differs(models, tmp_path):
    pipe = VideoPipeline(models)
    kwargs = dict(num_frames=3, context_length=4, steps=2)
    pipe("a red circle", **{**RUN, **kwargs}, work_dir=tmp_path)
    with pytest.raises(StaleRenderError, match=r"seed: 7 -> 9") as error:
        pipe("a red circle", **{**RUN, **kwargs, "seed": 9}, work_dir=tmp_path)
    assert "restart" in str(error.value)
    pipe("a red circle", **{**RUN, **kwargs, "seed": 9}, work_dir=tmp_path, restart=True)  # starts over
    with pytest.raises(UnresumableSamplerError, match="dpmpp_2m"):
        pipe("a red circle", **{**RUN, **kwargs, "sampler": "dpmpp_2m"}, work_dir=tmp_path)


# ----------------------------------------------------------------------------------------- other inputs


def test_video_to_video_keeps_the_input_at_low_strength(models):
    from diffstudio.demo.shapes import Scene, ShapeSpec, render_video
    from diffstudio.video.frames import LatentCodec

    clip, _ = render_video(Scene((ShapeSpec("circle", "red", "left"),), ("white",)), n_frames=5,
                           motion=[(0.4, 0.0)])
    pipe = VideoPipeline(models)
    known = LatentCodec(Pipeline(models)).encode(np.asarray(f) for f in clip)
    low = latent(pipe, init_video=clip, strength=0.5, steps=4)
    high = latent(pipe, init_video=clip, strength=1.0, steps=4)
    assert low.shape == known.shape == (5, 4, 8, 8)
    assert (low - known).abs().mean() < 0.5 * (high - known).abs().mean()
    frames = pipe("a red circle", init_video=clip, **RUN)
    assert len(frames) == 5 and frames[0].size == (64, 64)
    with pytest.raises(InvalidInputError, match="has 5 frames"):
        pipe("a red circle", init_video=clip, num_frames=6, **RUN)


def test_per_frame_control_images_pick_their_frames(models):
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
    from diffstudio.pipeline.control import ControlNetUnit

    config = ControlNetConfig.from_unet(models.configs["unet"], hint_block_channels=[16, 32, 32, 32])
    torch.manual_seed(0)
    net = ControlNetModel(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name:
                p.normal_(0, 0.3)
    hints = []
    for k in range(3):
        picture = np.full((64, 64, 3), 255, np.uint8)
        picture[8 + 12 * k:28 + 12 * k, 10:40] = 0  # a block moving down
        hints.append(picture)
    pipe = VideoPipeline(models)
    video = latent(pipe, num_frames=3, context_length=2, context_stride=1,
                   controlnets=[ControlNetUnit(net, hints)])
    for k in range(3):  # frame k of a frame-wise video = a one-frame video with frame k's seed and control image
        alone = latent(pipe, num_frames=1, seed=RUN["seed"] + k, controlnets=[ControlNetUnit(net, hints[k])])
        assert torch.allclose(video[k], alone[0], atol=1e-4, rtol=1e-4)


def test_named_errors(models, tmp_path):
    pipe = VideoPipeline(with_motion(models, motion_modules(models, max_frames=8)))
    with pytest.raises(InvalidSizeError, match="8 frame positions"):
        pipe("a red circle", num_frames=4, context_length=16, **RUN)
    with pytest.raises(InvalidInputError, match="stride"):
        pipe("a red circle", num_frames=4, context_length=4, context_stride=5, **RUN)
    with pytest.raises(InvalidInputError, match="init_video"):
        pipe("a red circle", strength=0.5, context_length=8, **RUN)
    with pytest.raises(InvalidInputError, match="smoother"):
        pipe("a red circle", smoother_steps=[1], context_length=8, **RUN)
    with pytest.raises(InvalidInputError, match="outside this run"):
        pipe("a red circle", num_frames=2, smoother="fastblend", smoother_steps=[5], context_length=8, **RUN)


def test_video_pipeline_is_the_front_of_the_families_with_their_own():
    """VideoPipeline(models) of an SVD or CogVideoX model is that family's pipeline; of an SD model, its own."""
    from types import SimpleNamespace

    from diffstudio.families.cogvideox import COGVIDEOX
    from diffstudio.families.sd15 import SD15
    from diffstudio.families.svd import SVD
    from diffstudio.video.cogvideo import CogVideoPipeline
    from diffstudio.video.render import VideoPipeline
    from diffstudio.video.svd import SVDPipeline

    assert type(VideoPipeline(SimpleNamespace(family=SVD))) is SVDPipeline
    config = SimpleNamespace(in_channels=COGVIDEOX.latent.channels, ofs_embed_dim=None)
    cog = SimpleNamespace(family=COGVIDEOX, configs={COGVIDEOX.denoiser_role: config})
    assert type(VideoPipeline(cog)) is CogVideoPipeline
    assert type(VideoPipeline(SimpleNamespace(family=SD15, components={}))) is VideoPipeline
