"""In-loop deflickering of a video render (DiffSynth-Studio's method, Duan et al. 2023, "DiffSynth: Latent
In-Iteration Deflickering for Realistic Video Synthesis", arXiv:2308.03463).

At chosen sampler steps the x0 prediction of every frame is decoded, the frames are deflickered by a
*smoother* (FastBlend: each frame rebuilt from patches of its neighbours matched through a guide video),
encoded again, and the step continues from the smoothed x0: the sampler computes its next x from that x0
instead of the network's. With an input video the guide is the input (its motion tells which patches
correspond); without one the decoded frames guide themselves. Step ``-1`` (or the step count) smooths the
decoded output once more after the last step.

Frames pass through disk (FastBlend's ``DiskFrames``), so smoothing needs memory for a window of frames,
not for the video.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import OUTPUT, Generation, Wrapper

SMOOTHERS = ("fastblend",)
AFTER_DECODING = -1


@dataclass
class FastBlendSmoother:
    """FastBlend (``diffstudio.video.fastblend.iter_blend``) with its settings; ``smoother(frames, guide)``
    yields the deflickered frames one by one."""

    mode: str = "fast"
    window_size: int = 15
    batch_size: int = 8
    minimum_patch_size: int = 5
    num_iter: int = 5
    guide_weight: float = 10.0
    tracking_window_size: int = 0
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        from diffstudio.video.fastblend import check_settings

        check_settings(mode=self.mode, window_size=self.window_size, batch_size=self.batch_size,
                       minimum_patch_size=self.minimum_patch_size, num_iter=self.num_iter,
                       guide_weight=self.guide_weight, tracking_window_size=self.tracking_window_size,
                       device=self.device)

    def describe(self) -> dict:
        skip = {"device"} | ({"tracking_window_size"} if not self.tracking_window_size else set())
        return {"smoother": "fastblend", **{k: v for k, v in asdict(self).items() if k not in skip}}

    def __call__(self, frames: Sequence, guide: Sequence) -> Iterator[np.ndarray]:
        from diffstudio.video.fastblend import iter_blend

        return iter_blend(frames, guide, mode=self.mode, window_size=self.window_size, batch_size=self.batch_size,
                          minimum_patch_size=self.minimum_patch_size, num_iter=self.num_iter,
                          guide_weight=self.guide_weight, tracking_window_size=self.tracking_window_size,
                          seed=self.seed, device=self.device)


def smoother_for(smoother) -> FastBlendSmoother | None:
    """``None``, ``"fastblend"`` or a smoother object (a callable ``(frames, guide) -> frames`` with
    ``describe()``)."""
    if smoother is None or callable(smoother):
        return smoother
    if smoother == "fastblend":
        return FastBlendSmoother()
    raise InvalidInputError(f"unknown smoother {smoother!r}; use one of: {', '.join(SMOOTHERS)} (or None)")


def smoothed_frames(smoother, frames, guide, folder: str | None) -> Iterator[np.ndarray]:
    """Deflicker a stream of frames: they are spilled to a raw file in ``folder`` (a temporary folder when
    None) and FastBlend reads them back a window at a time. ``guide``: a frame sequence, or None to let the
    frames guide themselves."""
    from diffstudio.video.fastblend import DiskFrames

    with DiskFrames.spill(frames, folder) as styles:
        yield from smoother(styles, styles if guide is None else guide)


class InLoopSmoothing:
    """The OUTPUT-stage module replacing the x0 of the steps in ``steps`` (indices into the run's schedule)
    by its smoothed version. ``step`` is the clock the render advances after each sampler step, so only the
    first evaluation of a step is smoothed (Heun evaluates twice)."""

    order = OUTPUT + 10

    def __init__(self, smoother, steps, codec, guide=None, folder: str | None = None):
        self.smoother, self.codec, self.guide, self.folder = smoother, codec, guide, folder
        self.requested = [int(s) for s in steps]
        self.steps: list[int] = []  # in-loop steps, known once the run's schedule is (wrap)
        self.after_decoding = False
        self.step = 0

    def recipe(self) -> dict:
        return {**self.smoother.describe(), "smoother_steps": self.requested}

    def smooth(self, x0: torch.Tensor) -> torch.Tensor:
        frames = smoothed_frames(self.smoother, self.codec.decode(x0), self.guide, self.folder)
        return self.codec.encode(frames).to(x0)

    def wrap(self, denoiser, gen: Generation):
        module, sigmas = self, [float(s) for s in gen.sigmas]
        last = len(sigmas) - 1
        in_loop, self.after_decoding = split_steps(self.requested, last)
        self.steps = sorted(set(in_loop))
        bad = [s for s in self.steps if not 0 <= s < last]
        if bad:
            raise InvalidInputError(f"smoother steps {bad} are outside this run's {last} steps (0..{last - 1}; "
                                    f"{AFTER_DECODING} or {last} smooths the decoded output)")

        class Smoothed(Wrapper):
            def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
                x0 = self.inner(x, sigma, **cond)
                level = float(torch.as_tensor(sigma).reshape(-1)[0])
                if module.step in module.steps and level == sigmas[module.step]:
                    x0 = module.smooth(x0)
                return x0

        return Smoothed(denoiser)


def split_steps(steps, total: int) -> tuple[list[int], bool]:
    """User's smoother steps -> (in-loop step indices, whether to smooth after decoding)."""
    steps = [int(s) for s in steps]
    after = any(s in (AFTER_DECODING, total) for s in steps)
    return [s for s in steps if s not in (AFTER_DECODING, total)], after

