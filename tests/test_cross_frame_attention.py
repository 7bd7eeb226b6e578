"""Cross-frame attention (the UNet's ``frame_attention`` hook; ``VideoPipeline(cross_frame_attention=True)``): each
frame's self-attention spans every frame of its video. It changes the frames of a video whose frames differ,
equals the frame-wise UNet when a video's frames are identical, keeps videos apart, and matches an independent
reference: the same UNet with each self-attention's keys/values replaced by the video's concatenated tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffstudio.demo.untrained import untrained_demo_models
from diffstudio.errors import InvalidInputError
from diffstudio.models.unet import BasicTransformerBlock
from diffstudio.video.render import VideoPipeline


@pytest.fixture(scope="module")
def models():
    return untrained_demo_models()


def inputs(models, videos: int, frames: int, seed: int = 0):
    torch.manual_seed(seed)
    rows = videos * frames
    x = torch.randn(rows, 4, 8, 8)
    t = torch.full((rows,), 500.0)
    context = torch.randn(1, 77, models.configs["unet"].context_dim).expand(rows, -1, -1)
    return x, t, context


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_differs_from_frame_wise_when_frames_differ(models):
    x, t, context = inputs(models, videos=2, frames=3)
    with torch.no_grad():
        plain = models.unet(x, t, context)
        across = models.unet(x, t, context, frame_attention=3)
    for i in range(6):
        assert rel_err(across[i], plain[i]) > 1e-3


def test_identical_frames_give_the_frame_wise_output(models):
    x, t, context = inputs(models, videos=2, frames=4)
    x = x.view(2, 4, 4, 8, 8)[:, :1].expand(2, 4, 4, 8, 8).reshape(8, 4, 8, 8)  # each video: one frame, 4 times
    with torch.no_grad():
        plain = models.unet(x, t, context)
        across = models.unet(x, t, context, frame_attention=4)
    assert rel_err(across, plain) < 1e-5


def test_videos_do_not_mix_and_a_reference_agrees(models):
    x, t, context = inputs(models, videos=2, frames=3, seed=1)
    with torch.no_grad():
        both = models.unet(x, t, context, frame_attention=3)
        first = models.unet(x[:3], t[:3], context[:3], frame_attention=3)
    assert rel_err(both[:3], first) < 1e-5
    # Reference: a hook that gives every self-attention layer the tokens of the whole video as its context
    # (queries stay per frame), run without the frame_attention argument.
    frames = 3

    def video_context(module, args, kwargs):
        hidden = args[0]
        b, n, c = hidden.shape
        joint = hidden.reshape(b // frames, 1, frames * n, c).expand(b // frames, frames, frames * n, c)
        return (hidden,), {**kwargs, "context": joint.reshape(b, frames * n, c)}

    handles = [block.attn1.register_forward_pre_hook(video_context, with_kwargs=True)
               for block in models.unet.modules() if isinstance(block, BasicTransformerBlock)]
    try:
        with torch.no_grad():
            reference = models.unet(x, t, context)
    finally:
        for h in handles:
            h.remove()
    assert rel_err(both, reference) < 1e-5


def test_frame_count_must_divide_the_batch(models):
    x, t, context = inputs(models, videos=1, frames=5)
    with pytest.raises(InvalidInputError, match="frame_attention"):
        models.unet(x, t, context, frame_attention=2)


def test_video_pipeline_option(models):
    pipe = VideoPipeline(models)
    run = dict(steps=2, cfg_scale=3.0, seed=5, progress=False, strength=0.8, context_length=3, context_stride=2)
    moving = []
    for i in range(4):
        picture = np.full((64, 64, 3), 240, np.uint8)
        picture[20:40, 5 + 8 * i:25 + 8 * i] = (30, 30, 200)
        moving.append(picture)

    def frames(clip, **kwargs):
        return np.stack([np.asarray(f, np.float32) for f in pipe("a blue square", init_video=clip, **run, **kwargs)])

    assert np.abs(frames(moving, cross_frame_attention=True) - frames(moving)).max() > 1
    still = [moving[0]] * 4
    on = frames(still, cross_frame_attention=True, same_noise=True)
    off = frames(still, same_noise=True)
    assert np.abs(on - off).max() <= 1  # identical frames: the frame-wise render (to rounding)
