"""``VideoPipeline``: AnimateDiff text-to-video and video re-rendering of any length (docs/animatediff.md).

    models = diffstudio.load("dreamshaper_8.safetensors")
    models.add_motion_module("mm_sd_v15_v2.ckpt")
    frames = diffstudio.VideoPipeline(models)("a boat on a lake", num_frames=32)
    diffstudio.VideoPipeline(models)("anime style", init_video="in.mp4", strength=0.6, output="out.mp4",
                                     smoother="fastblend", smoother_steps=[4, 9, -1], work_dir="render/")

The run is the image pipeline's (``Pipeline.prepare``: request, prompts, schedule, modules) over a latent of
shape (F, C, h, w) with the prompt encoded once, plus three modules (video/animatediff.py): context windows,
the per-frame network call with the motion modules, and the video start. Memory does not grow with the
length beyond the latents (64 KiB a frame at 512x512): the input is read as a stream and encoded a batch at a
time, the output decoded a batch at a time and written as it comes, the network sees one window at a time.
With a ``work_dir`` the state is saved after every step (video/workdir.py) and a render started again with
the same arguments continues where it stopped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffstudio.errors import InvalidInputError, InvalidSizeError
from diffstudio.pipeline.generate import Pipeline
from diffstudio.pipeline.request import Request
from diffstudio.video.animatediff import ContextWindows, Frames, VideoStart
from diffstudio.video.context import context_windows
from diffstudio.video.frames import InputVideo, LatentCodec, fingerprint
from diffstudio.video.smoothing import InLoopSmoothing, smoothed_frames, smoother_for
from diffstudio.video.workdir import WorkDir, check_sampler, restore_noise

DEFAULT_FRAMES = 16
DEFAULT_FPS = 8.0  # AnimateDiff's clips are sampled at about 8 frames a second


def motion_view(models):
    """``models`` as a video run sees it: with a motion module loaded, the family's motion schedule
    (``Family.for_motion``: AnimateDiff trained on other betas than the image model). Shares every module,
    patch list and LoRA with ``models``."""
    if "motion" not in models.components:
        return models
    view = copy.copy(models)
    view.family = models.family.for_motion()
    return view


def frame_noise(seed: int, num_frames: int, latent_shape, same_noise: bool = False, dilation: int = 1):
    """The noise of a render: one CPU generator per frame, frame i seeded ``seed + i`` (every frame ``seed`` with
    ``same_noise``), so a frame's noise - the start and every later draw - is the same whatever the video's
    length and window layout (the batch convention of the image pipeline, frames taking the place of images).
    With dilated context windows frame i is seeded ``seed + i // dilation``: the frames at one place of the
    interleaved windows share their noise, so those windows differ only in their sub-frame positions and render
    one motion at shifted times (video.context)."""
    from diffstudio.sampling.noise import SeededNoise

    seeds = [seed] * num_frames if same_noise else [seed + i // dilation for i in range(num_frames)]
    return SeededNoise(seeds, latent_shape, dtype=torch.float32, device="cpu")


class VideoPipeline:
    """``VideoPipeline(models)(prompt, ...) -> list of PIL frames`` (or the path of ``output``)."""

    def __new__(cls, models, *args, **kwargs):
        """A family with a video pipeline of its own (``Family.own_pipeline``: SVD, CogVideoX) gets that one, so
        ``VideoPipeline(models)`` is the front for every video model."""
        own = getattr(getattr(models, "family", None), "own_pipeline", None)
        if cls is VideoPipeline and own:
            import importlib

            module, name = own.split(":")
            return getattr(importlib.import_module(module), name)(models)
        return super().__new__(cls)

    def __init__(self, models, lora_dirs=()):
        self.models = models
        self.lora_dirs = list(lora_dirs)

    @property
    def motion(self):
        return self.models.components.get("motion")

    def __call__(self, prompt: str, negative_prompt: str = "", *, num_frames: int | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                 scheduler: str | None = None, sigmas=None, clip_skip: int | None = None, init_video=None,
                 strength: float | None = None, controlnets: Sequence = (), context_length: int = 16,
                 context_stride: int | None = None, context_dilation: int = 1, same_noise: bool = False,
                 cross_frame_attention: bool = False, smoother=None, smoother_steps=(),
                 work_dir=None, restart: bool = False, output=None, fps: float | None = None,
                 tiled_vae: bool | None = None, vae_batch: int = 8, progress: bool = True,
                 callback: Callable | None = None, on_window: Callable | None = None, modules: Sequence = ()):
        """Render a video. ``num_frames``: 16 for text to video; for an ``init_video`` (a video file, a folder
        of frames or a list of frames) its length, or its first ``num_frames``. ``strength``: how much of the
        input to repaint (default 0.75). ``controlnets``: ``ControlNetUnit``s whose image is one control image
        or a list with one per frame. ``context_length`` / ``context_stride``: the frames the network sees at
        once and the step between windows (default: half the length). ``context_dilation`` d: a window's frames
        lie d apart, so the module's motion over ``context_length`` frames spans d times as many (d = frames /
        length for one motion over the whole video; docs/animatediff.md). ``same_noise``: every frame starts from
        the same noise. ``cross_frame_attention``: each frame's self-attention spans every frame of its
        window (consistent frame-wise re-rendering without a motion module). ``smoother`` ("fastblend" or a
        ``FastBlendSmoother``) at ``smoother_steps`` (-1: after decoding).
        ``work_dir``: save the state after every step and continue from it (``restart``: discard it).
        ``output``: write a video file (.mp4/.mov/.mkv) or a folder of PNGs and return its path.
        ``callback(step, total, x, x0)`` after every step; ``on_window(step, total, window, windows)`` after every
        context window (``window`` 1-based of the step's ``windows``; ``step`` 0-based)."""
        from diffstudio.sampling import get_sampler
        from diffstudio.video import video_io

        started = time.time()
        context_stride = max(1, context_length // 2) if context_stride is None else context_stride
        if output is not None:
            video_io.check_output(str(output))  # before any work
        smoother = smoother_for(smoother)
        if smoother_steps and smoother is None:
            raise InvalidInputError("smoother_steps needs a smoother (smoother='fastblend', CLI: --smoother)")
        if smoother is not None and not smoother_steps:
            smoother_steps = (-1,)
        if not isinstance(context_dilation, int) or context_dilation < 1:
            raise InvalidInputError(f"context_dilation must be a whole number >= 1, got {context_dilation!r}")
        if self.motion is not None and context_length + (context_dilation > 1) > self.motion.config.max_frames:
            dilated = " with sub-frame positions (a dilation over 1)" if context_dilation > 1 else ""
            raise InvalidSizeError(f"the motion module knows {self.motion.config.max_frames} frame positions; use "
                                   f"a context length{dilated} of at most "
                                   f"{self.motion.config.max_frames - (context_dilation > 1)} (got {context_length})")
        if strength is not None and init_video is None:
            raise InvalidInputError("strength is how much of an input video to repaint; it needs init_video= "
                                    "(CLI: --input)")
        source = InputVideo(init_video) if init_video is not None else None
        if source is not None:
            width = source.size[0] if width is None else width
            height = source.size[1] if height is None else height
        else:
            num_frames = DEFAULT_FRAMES if num_frames is None else num_frames
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise InvalidInputError(f"num_frames must be a positive whole number, got {num_frames!r}")

        if not isinstance(prompt, str):
            raise InvalidInputError("a video has one prompt; pass a string")
        request = Request(prompt, negative_prompt, width=width, height=height, steps=steps, cfg_scale=cfg_scale,
                          seed=seed, sampler=sampler, scheduler=scheduler, sigmas=sigmas, clip_skip=clip_skip,
                          tiled_vae=tiled_vae)
        pipe = Pipeline(motion_view(self.models), self.lora_dirs)
        resolved = request.resolve(pipe.models)
        if work_dir is not None:
            check_sampler(resolved.sampler)
            workdir = WorkDir(work_dir, self._recipe(resolved, init_video, num_frames, strength, controlnets,
                                                     context_length, context_stride, same_noise, smoother,
                                                     smoother_steps, cross_frame_attention, context_dilation))
            saved = workdir.load(restart)
        else:
            workdir = saved = None

        codec = LatentCodec(pipe, resolved.tiled_vae, vae_batch)
        folder = str(work_dir) if work_dir is not None else None
        guide = None
        try:
            known = None
            if source is not None:
                strength = 0.75 if strength is None else float(strength)
                if not 0.0 < strength <= 1.0:
                    raise InvalidInputError(f"strength must be in (0, 1] (1 = repaint everything), got {strength}")
                frames = source.frames(resolved.width, resolved.height, num_frames)
                if smoother is not None:  # the input guides the smoother: kept on disk, read once
                    from diffstudio.video.fastblend import DiskFrames

                    guide = DiskFrames.spill(frames, folder)
                    frames = (guide[i] for i in range(len(guide)))
                with torch.inference_mode():
                    known = codec.encode(frames)
                num_frames = known.shape[0]

            bar = tqdm(desc="video", disable=not progress, leave=False)
            sampling = [0]  # the step being sampled (0-based), for on_window

            def window_done(i, n):
                bar.update(1)
                if on_window is not None:
                    on_window(sampling[0], total, i, n)

            windows = ContextWindows(context_length, context_stride, on_window=window_done, dilation=context_dilation)
            run_modules = [Frames(self.motion, cross_frame_attention), windows, *modules]
            if controlnets:
                from diffstudio.pipeline.control import ControlNets

                run_modules.append(ControlNets(controlnets))
            smoothing = None
            if smoother is not None:
                smoothing = InLoopSmoothing(smoother, smoother_steps, codec, guide, folder)
                run_modules.append(smoothing)
            gen = pipe.prepare(request, run_modules, start=VideoStart(known, strength))
            total = len(gen.sigmas) - 1
            per_step = len(context_windows(num_frames, context_length, context_stride, context_dilation))
            noise = frame_noise(seed, num_frames, gen.latent_shape, same_noise, context_dilation)
            if saved is not None:
                restore_noise(noise, saved)
                x, first = saved.x, saved.step
            else:
                x, first = gen.start.start(gen, noise.initial()), 0
            sampling[0] = first
            bar.reset(total=(total - first) * per_step)
            if smoothing is not None:
                smoothing.step = first

            def on_step(i, _, x_i, denoised):
                step = first + i
                sampling[0] = step + 1
                if workdir is not None:
                    workdir.save(x_i, step + 1, noise)
                if smoothing is not None:
                    smoothing.step = step + 1
                bar.set_postfix_str(f"step {step + 1}/{total}")
                if callback is not None:
                    callback(step, total, x_i, denoised)

            with torch.inference_mode():
                if first < total:
                    x = get_sampler(gen.request.sampler)(gen.guided, x, gen.sigmas[first:], callback=on_step,
                                                         noise=noise)
                bar.close()
                frames = codec.decode(x)
                if smoothing is not None and smoothing.after_decoding:
                    frames = smoothed_frames(smoother, frames, guide, folder)
                recipe = self._frame_recipe(gen, num_frames, started)
                if output is not None:
                    fps = fps or (source.fps if source is not None else None) or DEFAULT_FPS
                    video_io.write_frames(str(output), frames, fps)
                    return str(output)
                images = [Image.fromarray(np.asarray(f)) for f in frames]
        finally:
            if guide is not None:
                guide.close()
        for image in images:
            image.info["diffstudio_recipe"] = recipe
        return images

    # -- recipes ----------------------------------------------------------------------------------------
    def _recipe(self, r, init_video, num_frames, strength, controlnets, context_length, context_stride,
                same_noise, smoother, smoother_steps, cross_frame_attention=False, context_dilation=1) -> dict:
        """Everything that decides a render's result, inputs by content: what a work folder must match."""
        from diffstudio.patches.apply import lora_recipe
        from diffstudio.train.recipe import model_fingerprint

        models = {role: (model_fingerprint(path) if Path(path).exists() else str(path))
                  for role, path in sorted(self.models.sources.items())}
        units = [{**unit.describe(), "image": fingerprint(unit.image)} for unit in controlnets]
        return {
            "prompt": r.prompt, "negative_prompt": r.negative_prompt, "width": r.width, "height": r.height,
            "num_frames": num_frames, "steps": r.steps, "cfg_scale": r.cfg_scale, "seed": r.seed,
            "sampler": r.sampler, "scheduler": r.scheduler, "clip_skip": r.clip_skip,
            "sigmas": None if r.sigmas is None else [float(s) for s in r.sigmas], "guidance": r.guidance,
            "init_video": None if init_video is None else fingerprint(init_video),
            "strength": None if init_video is None else (0.75 if strength is None else float(strength)),
            "controlnets": units, "context_length": context_length, "context_stride": context_stride,
            "same_noise": same_noise, "smoother": None if smoother is None else smoother.describe(),
            "smoother_steps": [int(s) for s in smoother_steps], "models": models,
            **({"cross_frame_attention": True} if cross_frame_attention else {}),
            **({"context_dilation": context_dilation} if context_dilation > 1 else {}),
            "dtype": str(self.models.dtype), "device": str(self.models.device), **lora_recipe(self.models),
        }

    def _frame_recipe(self, gen, num_frames: int, started: float) -> dict:
        r = gen.request
        extra = {"seconds": round(time.time() - started, 2)}
        for module in gen.modules:
            extra.update(getattr(module, "recipe", dict)())
        return {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "width": r.width, "height": r.height,
                "num_frames": num_frames, "steps": r.steps, "cfg_scale": r.cfg_scale, "seed": r.seed,
                "sampler": r.sampler, "scheduler": r.scheduler, "family": gen.family.name,
                "motion": str(self.models.sources.get("motion", "")).split("/")[-1] or None, "extra": extra}
