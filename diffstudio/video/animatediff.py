"""AnimateDiff as denoiser modules (docs/animatediff.md, "Video runs").

A video run denoises one latent of shape (F, C, h, w): F frames of one video, the prompt encoded once
(the conditioning has one row, or two under CFG). Three modules make an image denoiser a video one:

* ``ContextWindows`` (LATENT stage) calls the guided denoiser once per context window with ``x[window]``,
  the window's sigmas and the keyword ``frames`` (a LongTensor of the window's frame indices), and blends
  the x0 predictions of overlapping windows with the tent weights of ``video.context``. CFG passes
  ``frames`` down with the conditional and unconditional rows stacked (cond rows first). Dilated windows
  also pass ``frame_positions``, the window's sub-frame positions (``video.context.window_positions``).
* ``Frames`` (NETWORK stage) turns that call into the network's: it takes ``frames`` out, repeats every
  conditioning row once per frame (rows = x rows // len(frames) videos, frame index fastest) and hands the
  UNet its temporal hook, ``motion=`` the motion modules (at ``frame_positions`` where given) and
  ``num_frames=len(frames)``. Without a motion
  module the same call renders each frame on its own. Modules inside it that read per-frame inputs declare
  ``takes_frames = True`` (the ControlNet units' per-frame control images) and get ``frames`` passed on.
  With ``cross_frame_attention`` it also passes ``frame_attention=len(frames)``: the UNet's self-attention then
  spans all frames of the window (the frame-wise re-render of Diffutoon's editing branch, docs/diffutoon.md).
* ``VideoStart`` is the run's start latent: noise, or the input video's latents noised to the level
  ``strength`` picks (the schedule keeps its last ``strength`` fraction of steps, as img2img does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.control import FRAMES
from diffstudio.pipeline.modules import LATENT, NETWORK, Generation, Wrapper
from diffstudio.pipeline.start import TextToImage
from diffstudio.video.context import context_windows, window_positions, windowed

FRAME_POSITIONS = "frame_positions"  # dilated context windows: the motion module's positions of the window's frames


def rows_per_frame(cond: dict, videos: int, num_frames: int) -> dict:
    """Each tensor entry with one row per video -> one row per frame: (videos, ...) -> (videos * F, ...),
    row v * F + f holding video v's row (the layout of x: frame index fastest)."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == videos and num_frames > 1:
            value = value.repeat_interleave(num_frames, dim=0)
        out[key] = value
    return out


class Frames:
    """The network call of a context window: per-frame conditioning rows and, with ``motion``, AnimateDiff's
    temporal hook (``motion=``, ``num_frames=``), and with ``cross_frame_attention`` the UNet's cross-frame
    attention hook over the window (``frame_attention=``). A call without ``frames`` passes through unchanged."""

    order = NETWORK + 20  # outside the ControlNet units (NETWORK + 10): they see one conditioning row per frame

    def __init__(self, motion=None, cross_frame_attention: bool = False):
        self.motion, self.cross_frame_attention = motion, cross_frame_attention

    def recipe(self) -> dict:
        return {"cross_frame_attention": True} if self.cross_frame_attention else {}

    def wrap(self, denoiser, gen: Generation):
        motion, across = self.motion, self.cross_frame_attention
        pass_frames = bool(getattr(denoiser, "takes_frames", False))

        class FrameRows(Wrapper):
            def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
                frames = cond.pop(FRAMES, None)
                positions = cond.pop(FRAME_POSITIONS, None)
                if frames is None:
                    return self.inner(x, sigma, **cond)
                count = len(frames)
                if x.shape[0] % count:
                    raise InvalidInputError(f"{x.shape[0]} latent rows do not split into videos of {count} frames")
                cond = rows_per_frame(cond, x.shape[0] // count, count)
                if motion is not None:
                    cond.update(motion=motion if positions is None else motion.at(positions), num_frames=count)
                if across:
                    cond["frame_attention"] = count
                if pass_frames:
                    cond[FRAMES] = frames
                return self.inner(x, sigma, **cond)

        return FrameRows(denoiser)


class ContextWindows:
    """Denoise the frame axis in overlapping windows of ``length`` frames, one every ``stride`` frames, their
    frames ``dilation`` apart (``video.context.context_windows``); ``on_window(index, count)`` is called after
    each window."""

    order = LATENT

    def __init__(self, length: int = 16, stride: int = 8, on_window: Callable[[int, int], None] | None = None,
                 dilation: int = 1):
        if length < 1 or stride < 1 or stride > length or dilation < 1:
            raise InvalidInputError(f"context windows need 1 <= stride <= length and dilation >= 1; got length "
                                    f"{length}, stride {stride}, dilation {dilation} (half the length is usual)")
        self.length, self.stride, self.dilation, self.on_window = length, stride, dilation, on_window

    def recipe(self) -> dict:
        dilated = {"context_dilation": self.dilation} if self.dilation > 1 else {}
        return {"context_length": self.length, "context_stride": self.stride, **dilated}

    def wrap(self, denoiser, gen: Generation):
        module = self

        class Windowed(Wrapper):
            def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
                sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
                count = len(context_windows(x.shape[0], module.length, module.stride, module.dilation))
                done = []

                def one(window: torch.Tensor, frames) -> torch.Tensor:
                    index = torch.tensor(frames, dtype=torch.long)
                    extra = {FRAMES: index}
                    if module.dilation > 1:
                        extra[FRAME_POSITIONS] = window_positions(frames, module.dilation)
                    out = self.inner(window, sigma[index], **cond, **extra)
                    done.append(1)
                    if module.on_window is not None:
                        module.on_window(len(done), count)
                    return out

                return windowed(one, x, module.length, module.stride, dilation=module.dilation)

        return Windowed(denoiser)


class VideoStart(TextToImage):
    """The start latent of a video run: noise (text to video), or ``known`` latents (F, C, h, w) of an input
    video noised to the first sigma of the schedule ``strength`` trims (video to video)."""

    def __init__(self, known: torch.Tensor | None = None, strength: float | None = None):
        self.known, self.strength = known, strength

    def prepare(self, gen: Generation, pipe) -> list:
        from diffstudio.sampling.schedules import sigmas_for_strength

        if self.known is not None:
            gen.known = self.known
            if gen.request.sigmas is None:  # a custom schedule is taken as given
                gen.sigmas = sigmas_for_strength(gen.sigmas, self.strength)
        return []

    def start(self, gen: Generation, noise: torch.Tensor) -> torch.Tensor:
        base = torch.zeros_like(noise) if self.known is None else self.known.to(noise)
        return gen.denoiser.noise_scaling(gen.sigmas[0], noise, base)
