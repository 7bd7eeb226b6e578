"""Diffutoon end to end on the Shapes world: the demo model, its motion module and its outline ControlNet (as the
lineart unit, with its canny annotator) toon-shade a synthetic video of a red circle moving right, 2 px a frame.
Every output frame keeps the input's shape and position (the scorer), and the video flickers far less than a
frame-wise render with the same ControlNet but no motion module, no windows and no FastBlend (warp error under
the known motion: frame i + 1 against frame i moved by the circle's known shift). Measured (6 DDIM steps, CFG 7,
windows of 12 every 4, the "fast" FastBlend preset): warp error 3.1 against 23.5 frame-wise, 16 / 16 frames right
in both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import diffstudio
from diffstudio.control import canny
from diffstudio.demo.score import read_image
from diffstudio.loader import default_model_path
from diffstudio.pipeline.control import ControlNetUnit
from diffstudio.video.diffutoon import _without_motion, ddim_sigmas, toon_shade
from diffstudio.video.render import VideoPipeline

WEIGHTS = Path(__file__).resolve().parent.parent / "diffstudio" / "demo" / "weights"
MOTION, CONTROLNET = WEIGHTS / "shapes-motion.safetensors", WEIGHTS / "shapes-controlnet.safetensors"
pytestmark = pytest.mark.skipif(not (default_model_path().exists() and MOTION.exists() and CONTROLNET.exists()),
                                reason="the Shapes demo weights are not built")
FRAMES, SHIFT, START, RADIUS = 16, 2, 14, 10
STEPS = 6  # the paper's 10 cost twice the time and give the same picture on this model


def centre(i: int) -> int:
    return START + SHIFT * i


def moving_circle() -> list[np.ndarray]:
    frames = []
    for i in range(FRAMES):
        picture = Image.new("RGB", (64, 64), "white")
        x = centre(i)
        ImageDraw.Draw(picture).ellipse((x - RADIUS, 22, x + RADIUS, 42), fill=(220, 30, 30))
        frames.append(np.asarray(picture))
    return frames


def warp_error(frames) -> float:
    """Mean |frame i+1 - frame i moved by the known motion|: inside frame i+1's circle (one pixel wider) the
    pixels come from SHIFT pixels to the left, the background stays."""
    f = [np.asarray(x, np.float32) for x in frames]
    errors = []
    for i in range(len(f) - 1):
        mask = Image.new("L", (64, 64), 0)
        x = centre(i + 1)
        ImageDraw.Draw(mask).ellipse((x - RADIUS - 1, 21, x + RADIUS + 1, 43), fill=255)
        inside = np.asarray(mask) > 0
        moved = f[i].copy()
        moved[inside] = np.roll(f[i], SHIFT, axis=1)[inside]
        errors.append(np.abs(f[i + 1] - moved).mean())
    return float(np.mean(errors))


def kept(frames) -> int:
    """Frames where the scorer finds a red circle at the input's centre (within 0.08 of the side)."""
    count = 0
    for i, frame in enumerate(frames):
        red = [s for s in read_image(frame) if s.color == "red"]
        if red and red[0].kind == "circle" and abs(red[0].centroid[0] - centre(i) / 64) < 0.08 \
                and abs(red[0].centroid[1] - 0.5) < 0.08:
            count += 1
    return count


def test_toon_shading_keeps_the_shape_and_flickers_less_than_frame_wise():
    models = diffstudio.load()
    models.add_motion_module(MOTION)
    clip = moving_circle()
    assert warp_error(clip) < 1.0  # the known motion explains the input (up to its anti-aliased rim)
    toon = toon_shade(models, clip, "a red circle", lineart_controlnet=CONTROLNET, lineart="canny", steps=STEPS,
                      context_length=12, context_stride=4, smoother="fast", progress=False)
    frame_wise_models = _without_motion(models)
    frame_wise = VideoPipeline(frame_wise_models)(
        "a red circle", init_video=clip, strength=1.0, sigmas=ddim_sigmas(frame_wise_models.family, STEPS),
        sampler="ddim", cfg_scale=7.0, clip_skip=2, seed=0, context_length=1, context_stride=1, progress=False,
        controlnets=[ControlNetUnit(CONTROLNET, [canny(f) for f in clip], scale=0.5)])
    assert kept(toon) >= FRAMES - 1  # measured 16 / 16
    toon_error, frame_wise_error = warp_error(toon), warp_error(frame_wise)
    assert toon_error * 3 < frame_wise_error, (toon_error, frame_wise_error)  # measured 3.1 against 23.5
