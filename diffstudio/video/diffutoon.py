"""Diffutoon: toon shading of real videos (Duan et al. 2024, "Diffutoon: High-Resolution Editable Toon Shading
via Diffusion Models", IJCAI 2024, arXiv:2401.16224), built from the video engine's parts (docs/diffutoon.md).

    models = diffstudio.load("aingdiffusion_v12.safetensors")
    models.add_motion_module("mm_sd_v15_v2.ckpt")
    toon_shade(models, "dance.mp4", "best quality, perfect anime illustration, a girl is dancing",
               lineart_controlnet="control_v11p_sd15_lineart.pth", tile_controlnet="control_v11f1e_sd15_tile.pth",
               negative_embeddings=["verybadimagenegative_v1.3.pt"], output="toon.mp4", work_dir="render/")

**Main toon-shading pass** (the paper's sec. 3, its settings are the defaults here): the SD 1.x model with an
AnimateDiff motion module, two ControlNets at 0.5 each - lineart (the annotator run on the input frames) and
tile (the input frame itself, or the editing branch's output) -, CFG 7, clip skip 2, denoising strength 1,
10 DDIM steps on AnimateDiff's linear betas (timesteps 999, 888, ..., 0), context windows of 16 frames every 8
with the tent blend (``VideoPipeline``). Sizes are rounded to multiples of 64.

**Editing branch** (``edit_prompt``; the paper's sec. 3.3), two stages:
stage 1 re-renders the input at a low resolution with the same checkpoint *without* motion modules, guided by
softedge + depth ControlNets (0.5 each), denoising strength 0.9, 20 steps, cross-frame attention over each
window, the same initial noise for every frame, then FastBlend; stage 2 is the main pass with the tile
ControlNet fed the stage-1 video (the lineart still comes from the input).

Every intermediate (the input at the render size, the control videos, the stage-1 video, each stage's sampler
state) lives in the work folder as files, so a killed render started again with the same call continues, and
memory stays flat in the length (frames are read from disk a window at a time).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffstudio.control.names import ANNOTATORS
from diffstudio.errors import InvalidInputError, InvalidSizeError

SIZE_MULTIPLE = 64  # the paper renders at multiples of 64 (the UNet halves the latent three times, and tiles)
DDIM_TRAIN_STEPS = 1000


class DiffutoonSetupError(InvalidInputError):
    """A Diffutoon run that lacks a part it needs: the motion module, a ControlNet, the depth of the editing
    branch. The message names the part and the argument (or config key) that gives it."""


class MissingDepthError(DiffutoonSetupError):
    """The editing branch has a depth ControlNet but no depth for it: give ``edit_depth`` (``"depth"``, a callable
    frame -> depth image, or a precomputed depth video)."""


class WindowTooLongError(InvalidSizeError):
    """The context window is longer than the motion module's frame positions (24 or 32)."""


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SmootherPreset:
    """A FastBlend setting for Diffutoon: ``fastblend`` keywords and the steps it acts on (-1: after decoding)."""

    fastblend: dict
    steps: tuple[int, ...]

    def smoother(self, device=None):
        from diffstudio.video.smoothing import FastBlendSmoother

        return FastBlendSmoother(**self.fastblend, device=device)


SMOOTHER_PRESETS = {
    # The paper's: accurate mode, window 30, batch 64, tracking, inside the loop (at every 5th of the 10 steps:
    # the x0 of step 4 and of the last step; DiffSynth-Studio's re-render smooths every 5th step the same way).
    "accurate": SmootherPreset({"mode": "accurate", "window_size": 30, "batch_size": 64,
                                "tracking_window_size": 1}, (4, 9)),
    # The released code's: fast mode, window 60, once after decoding.
    "fast": SmootherPreset({"mode": "fast", "window_size": 60}, (-1,)),
}


def resolve_smoother(smoother, steps, total_steps: int):
    """(smoother object or None, its steps) of a preset name, a ``FastBlendSmoother`` or None. A preset's
    in-loop steps beyond a shorter run are mapped onto its last step."""
    from diffstudio.video.smoothing import smoother_for

    if smoother is None:
        return None, ()
    if isinstance(smoother, str) and smoother in SMOOTHER_PRESETS:
        preset = SMOOTHER_PRESETS[smoother]
        chosen = steps if steps is not None else sorted({min(s, total_steps - 1) if s >= 0 else s
                                                         for s in preset.steps})
        return preset.smoother(), tuple(chosen)
    if isinstance(smoother, str) and smoother != "fastblend":
        raise InvalidInputError(f"unknown smoother {smoother!r}: use a preset ({', '.join(SMOOTHER_PRESETS)}), "
                                "'fastblend', a FastBlendSmoother, or None")
    return smoother_for(smoother), tuple(steps if steps is not None else (-1,))


def round_size(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """The nearest multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def ddim_timesteps(steps: int, strength: float = 1.0, train_steps: int = DDIM_TRAIN_STEPS) -> list[int]:
    """DiffSynth-Studio's DDIM timesteps (its EnhancedDDIMScheduler, which Diffutoon used): ``steps`` timesteps
    evenly spaced from ``round(train_steps * strength) - 1`` down to 0, rounded. 10 steps at strength 1:
    999, 888, ..., 111, 0 (our "normal" schedule gives the same); strength 0.9 starts at 899 and keeps all
    ``steps`` steps (img2img in our image pipeline instead drops the first tenth of them)."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be a positive whole number, got {steps!r}")
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError(f"strength must be in (0, 1], got {strength}")
    top = max(round(train_steps * strength) - 1, 0)
    if steps == 1:
        return [top]
    return [round(top - i * top / (steps - 1)) for i in range(steps)]


def ddim_sigmas(family, steps: int, strength: float = 1.0):
    """The sigmas of ``ddim_timesteps`` on a family record's training schedule, then 0 (the last step lands on
    the clean sample, as DiffSynth's final step does)."""
    import torch

    from diffstudio.sampling.schedules import betas_for, model_sigmas, t_to_sigma

    s = family.schedule
    table = model_sigmas(betas_for(s.kind, s.beta_start, s.beta_end, s.num_steps))
    t = torch.tensor(ddim_timesteps(steps, strength, s.num_steps), dtype=torch.float64)
    return torch.cat([t_to_sigma(t, table), torch.zeros(1, dtype=torch.float64)]).float()


@dataclass
class InputSpec:
    """Which part of the input video to render: ``crop`` (left, top, right, bottom) in source pixels, then the
    frames ``start`` (0-based) up to ``end`` (exclusive; None: to the end)."""

    crop: tuple[int, int, int, int] | None = None
    start: int = 0
    end: int | None = None

    def __post_init__(self):
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise InvalidInputError(f"the frame range needs 0 <= start < end, got start={self.start}, end={self.end}")
        if self.crop is not None:
            left, top, right, bottom = (int(v) for v in self.crop)
            if not (0 <= left < right and 0 <= top < bottom):
                raise InvalidInputError(f"crop is (left, top, right, bottom) with left < right, top < bottom; got "
                                        f"{tuple(self.crop)}")
            self.crop = (left, top, right, bottom)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    name: str
    width: int
    height: int
    steps: int
    windows: int
    window_length: int
    cfg: bool
    controlnets: list[str]
    motion: bool
    smoother: str | None

    @property
    def unet_calls(self) -> int:
        """Network calls: one per window and step (CFG stacks its two halves into that call)."""
        return self.steps * self.windows


@dataclass
class ToonPlan:
    """What a run will do: frames, sizes, windows, calls and an estimate of its peak device memory."""

    frames: int
    fps: float | None
    stages: list[StagePlan] = field(default_factory=list)
    memory_gib: float = 0.0
    weights_gib: float = 0.0

    def describe(self) -> str:
        lines = [f"frames: {self.frames}" + (f" at {self.fps:g} fps" if self.fps else "")]
        for s in self.stages:
            guidance = "CFG: cond + uncond rows in each call" if s.cfg else "no CFG"
            lines.append(f"{s.name}: {s.width}x{s.height}, {s.steps} steps, {s.windows} window(s) of "
                         f"{s.window_length} frames, {s.unet_calls} UNet calls ({guidance}), motion module "
                         f"{'on' if s.motion else 'off'}, ControlNets: {', '.join(s.controlnets) or 'none'}, "
                         f"smoother: {s.smoother or 'none'}")
        lines.append(f"estimated peak device memory: {self.memory_gib:.1f} GiB (weights {self.weights_gib:.1f} GiB; "
                     "an estimate from the sizes, not a measurement)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "fps": self.fps, "memory_gib": round(self.memory_gib, 2),
                "weights_gib": round(self.weights_gib, 2),
                "stages": [{**asdict(s), "unet_calls": s.unet_calls} for s in self.stages]}


# Activation bytes per latent pixel and row of an SD 1.x UNet step (with a motion module and a ControlNet's
# encoder alongside), in units of the compute dtype: the widest live tensors are the level-0 transformer's
# GEGLU (2 x 4 x 320 channels) plus the skips and the attention's q/k/v/out; 40 x 320 covers them with margin.
UNET_BYTES_PER_LATENT_PIXEL = 40 * 320
# The VAE decoder's peak per output pixel and frame: its 128-512 channel stages at full size, two alive at once.
VAE_BYTES_PER_PIXEL = 8 * 128


def estimate_memory_gib(width: int, height: int, rows: int, weights_bytes: int, dtype_bytes: int = 2,
                        vae_batch: int = 8) -> float:
    """Peak device memory of one window: weights + UNet activations for ``rows`` latent rows (window x CFG),
    or the VAE decoding ``vae_batch`` frames, whichever is larger. An estimate (the constants above)."""
    latent = (width // 8) * (height // 8)
    unet = rows * latent * UNET_BYTES_PER_LATENT_PIXEL * dtype_bytes
    vae = vae_batch * width * height * VAE_BYTES_PER_PIXEL * dtype_bytes
    return (weights_bytes + max(unet, vae)) / 2**30


def _weights_bytes(modules) -> int:
    total = 0
    for module in modules:
        for p in getattr(module, "parameters", list)():
            total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------- frames on disk


class _Stage:
    """A folder of numbered PNG frames with a ``done.json`` naming what they are; reused when it matches."""

    def __init__(self, folder: Path, key: dict):
        self.folder, self.key = folder, json.loads(json.dumps(key))
        self.marker = folder / "done.json"

    def existing(self) -> list[str] | None:
        if self.marker.exists() and json.loads(self.marker.read_text()).get("key") == self.key:
            return json.loads(self.marker.read_text())["files"]
        return None

    def write(self, frames) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.marker.exists():
            self.marker.unlink()
        files = []
        for i, frame in enumerate(frames):
            path = self.folder / f"{i:05d}.png"
            Image.fromarray(np.asarray(frame)[:, :, :3]).save(path)
            files.append(str(path))
        if not files:
            raise InvalidInputError("no frames to write: the frame range selects none")
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "files": files}))
        os.replace(tmp, self.marker)
        return files

    def get(self, make) -> list[str]:
        done = self.existing()
        return done if done is not None else self.write(make())


def _source_frames(video, spec: InputSpec):
    """The input's frames (H, W, 3) uint8 after the frame range and the crop, as a stream."""
    from diffstudio.video.frames import InputVideo

    source = InputVideo(video)
    for i, frame in enumerate(source.frames(*source.size)):
        if i < spec.start:
            continue
        if spec.end is not None and i >= spec.end:
            return
        if spec.crop is not None:
            left, top, right, bottom = spec.crop
            if right > frame.shape[1] or bottom > frame.shape[0]:
                raise InvalidInputError(f"crop {spec.crop} reaches outside the {frame.shape[1]}x{frame.shape[0]} "
                                        "frames")
            frame = frame[top:bottom, left:right]
        yield frame


def _cover(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover (width, height) and centre-crop (Lanczos); the aspect ratio is kept."""
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    picture = Image.fromarray(frame).resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(picture.crop((left, top, left + width, top + height)))


def source_size(video, spec: InputSpec) -> tuple[int, int]:
    """(width, height) of the input after the crop."""
    from diffstudio.video.frames import InputVideo

    if spec.crop is not None:
        left, top, right, bottom = spec.crop
        return right - left, bottom - top
    return InputVideo(video).size


def render_size(video, spec: InputSpec, width: int | None, height: int | None) -> tuple[int, int]:
    """The render size: as given, else the (cropped) input's; a missing side follows the aspect ratio; both
    rounded to multiples of 64."""
    w0, h0 = source_size(video, spec)
    if width is None and height is None:
        width, height = w0, h0
    elif width is None:
        width = height * w0 / h0
    elif height is None:
        height = width * h0 / w0
    return round_size(width), round_size(height)


def count_frames(video, spec: InputSpec) -> int:
    """Frames the range selects (reads the input once, without decoding to the render size)."""
    return sum(1 for _ in _source_frames(video, spec))


def _annotator(annotator) -> Callable | None:
    """An annotator by name (diffstudio.control's; the learned ones read $DIFFSTUDIO_ANNOTATORS) or a callable
    image -> image; None: none."""
    from diffstudio.control import annotators
    from diffstudio.pipeline.control import PREPROCESSORS

    named = {name: getattr(annotators, name) for name in PREPROCESSORS}
    if annotator is None or callable(annotator):
        return annotator
    if isinstance(annotator, str) and annotator in named:
        return named[annotator]
    raise InvalidInputError(f"unknown annotator {annotator!r}: use one of {', '.join(named)}, a callable "
                            "image -> image (e.g. a controlnet-aux detector), or None for the frame itself")


def _annotator_name(annotator) -> str | None:
    from diffstudio.pipeline.control import preprocess_name

    return None if annotator is None else preprocess_name(annotator)


def _annotate(files: list[str], annotator, folder: Path, key: dict) -> list[str]:
    """Run ``annotator`` once on every frame file (control images are computed once, not per window)."""
    fn = _annotator(annotator)
    if fn is None:
        return files

    def make():
        for path in files:
            out = fn(Image.open(path).convert("RGB"))
            yield np.asarray(out.convert("RGB") if hasattr(out, "convert") else out)

    return _Stage(folder, {**key, "annotator": _annotator_name(annotator)}).get(make)


def _frames_of(video_or_frames, width: int, height: int, folder: Path, key: dict) -> list[str]:
    """A precomputed control video (file, folder or list of frames) at (width, height) as frame files."""
    return _Stage(folder, key).get(lambda: (_cover(f, width, height) for f in _source_frames(video_or_frames,
                                                                                             InputSpec())))


# ---------------------------------------------------------------------------------------------- the run


def _unit(model, images, scale: float):
    from diffstudio.pipeline.control import ControlNetUnit

    return ControlNetUnit(model, list(images), scale=scale)


def _without_motion(models):
    """``models`` sharing every module and patch, but with no motion module (the editing branch's stage 1)."""
    twin = models.clone()
    twin.components.pop("motion", None)
    twin.configs.pop("motion", None)
    twin.sources.pop("motion", None)
    return twin


def _with_embeddings(models, negative_prompt: str, embeddings: Sequence) -> tuple[object, str]:
    """A clone with the textual-inversion files loaded, and the negative prompt with their names appended
    (as Diffutoon's configs name ``verybadimagenegative_v1.3`` in the negative prompt)."""
    if not embeddings:
        return models, negative_prompt
    twin = models.clone()
    names = []
    for path in embeddings:
        names += [e.name for e in twin.add_embedding(path)]
    missing = [n for n in names if n not in negative_prompt]
    return twin, ", ".join([p for p in [negative_prompt, *missing] if p])


def toon_shade(models, video, prompt: str, negative_prompt: str = "", *, edit_prompt: str | None = None,
               edit_negative_prompt: str | None = None, output=None, width: int | None = None,
               height: int | None = None, crop=None, start: int = 0, end: int | None = None,
               lineart_controlnet=None, lineart="lineart", lineart_scale: float = 0.5,
               tile_controlnet=None, tile=None, tile_scale: float = 0.5, steps: int = 10, cfg_scale: float = 7.0,
               clip_skip: int = 2, strength: float = 1.0, seed: int = 0, context_length: int = 16,
               context_stride: int = 8, smoother="accurate", smoother_steps=None, negative_embeddings: Sequence = (),
               edit_size: int = 512, edit_softedge_controlnet=None, edit_softedge="softedge",
               edit_depth_controlnet=None, edit_depth=None, edit_scales: tuple[float, float] = (0.5, 0.5),
               edit_steps: int = 20, edit_strength: float = 0.9, edit_cfg_scale: float = 7.0, edit_clip_skip: int = 1,
               edit_context_length: int = 8, edit_context_stride: int = 4, edit_smoother="fast",
               work_dir=None, restart: bool = False, fps: float | None = None, vae_batch: int = 8,
               tiled_vae: bool | None = None, progress: bool = True, dry_run: bool = False,
               on_window: Callable | None = None):
    """Toon-shade ``video`` (a file, a folder of frames or a list of frames) with ``models`` (SD 1.x with a motion
    module). Returns the output path, or the frames (PIL) when ``output`` is None, or the plan (``ToonPlan``)
    with ``dry_run``. Arguments by group (docs/diffutoon.md has the table):

    input: ``crop`` (left, top, right, bottom), frames ``start``..``end``; ``width``/``height`` (default: the
    input's; rounded to multiples of 64). Main pass: ``lineart_controlnet`` (path or loaded) fed
    ``lineart`` (an annotator name, a callable, or None for frames already annotated) on the input;
    ``tile_controlnet`` fed ``tile`` (None: the frame itself) on the input or the stage-1 video; sampling
    ``steps``, ``cfg_scale``, ``clip_skip``, ``strength``, ``seed``; windows ``context_length``/``context_stride``;
    ``smoother`` (``"accurate"``, ``"fast"``, a FastBlendSmoother or None) at ``smoother_steps`` (default: the
    preset's); ``negative_embeddings``: textual-inversion files, loaded and named in the negative prompt.
    Editing branch (with ``edit_prompt``): ``edit_size`` (the longer side of stage 1), softedge and depth
    ControlNets and their annotators (``edit_depth``: a callable or a precomputed depth video), ``edit_*``
    sampling settings. ``work_dir``: every intermediate and each stage's state (resumable; ``restart`` starts
    the stages over). ``fps``: default the input's. ``on_window(stage, step, steps, window, windows)`` after
    every context window of every sampling step (``stage``: ``"edit"`` for stage 1, ``"toon"`` for the main pass;
    ``step`` 0-based, ``window`` 1-based): a server's per-window progress."""
    from diffstudio.video.render import VideoPipeline

    spec = InputSpec(tuple(crop) if crop is not None else None, int(start), end)
    if output is not None:
        from diffstudio.video import video_io

        video_io.check_output(str(output))
    motion = models.components.get("motion")
    if motion is None:
        raise DiffutoonSetupError("the main toon-shading pass needs an AnimateDiff motion module: "
                                  "models.add_motion_module('mm_sd_v15_v2.ckpt') (config: models.motion)")
    if context_length > motion.config.max_frames:
        raise WindowTooLongError(f"a context window of {context_length} frames is longer than the motion module's "
                                 f"{motion.config.max_frames} frame positions: use context_length <= "
                                 f"{motion.config.max_frames} (16 is what AnimateDiff was trained on)")
    if lineart_controlnet is None:
        raise DiffutoonSetupError("the main pass needs a lineart ControlNet: lineart_controlnet="
                                  "'control_v11p_sd15_lineart.pth' (config: controlnets.lineart.model)")
    editing = edit_prompt is not None
    if editing and tile_controlnet is None:
        raise DiffutoonSetupError("the editing branch hands its video to the tile ControlNet: give tile_controlnet="
                                  "'control_v11f1e_sd15_tile.pth' (config: controlnets.tile.model)")
    if editing and edit_depth_controlnet is not None and edit_depth is None:
        raise MissingDepthError("stage 1 of the editing branch has a depth ControlNet but no depth: pass "
                                "edit_depth=\"depth\" (MiDaS through controlnet-aux, its weight file in the annotator "
                                "folder), a callable frame -> depth image, or a depth video (file, folder or list of "
                                "frames)")
    main_smoother, main_smoother_steps = resolve_smoother(smoother, smoother_steps, steps)
    edit_smoother_obj, edit_smoother_steps = resolve_smoother(edit_smoother, None, edit_steps) if editing \
        else (None, ())

    width, height = render_size(video, spec, width, height)
    if editing:
        scale = edit_size / max(width, height)
        edit_w, edit_h = round_size(width * scale), round_size(height * scale)
    plan = _plan(models, video, spec, width, height, steps, cfg_scale, context_length, context_stride,
                 [c for c in (lineart_controlnet, tile_controlnet) if c is not None], main_smoother,
                 main_smoother_steps, vae_batch, fps)
    if editing:
        plan.stages.insert(0, StagePlan("stage 1 (editing, frame-wise)", edit_w, edit_h, edit_steps,
                                        _window_count(plan.frames, edit_context_length, edit_context_stride),
                                        min(edit_context_length, plan.frames), edit_cfg_scale != 1, [
                                            n for n, c in (("softedge", edit_softedge_controlnet),
                                                           ("depth", edit_depth_controlnet)) if c is not None],
                                        False, _smoother_label(edit_smoother_obj, edit_smoother_steps)))
    if dry_run:
        return plan

    models, negative_prompt = _with_embeddings(models, negative_prompt, negative_embeddings)
    if edit_negative_prompt is None:
        edit_negative_prompt = negative_prompt
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    temporary = tempfile.TemporaryDirectory(prefix="diffutoon-") if work_dir is None else None
    root = Path(work_dir if work_dir is not None else temporary.name)
    try:
        source_key = {"video": _digest(video), "crop": spec.crop, "start": spec.start, "end": spec.end}
        say(f"diffutoon: {plan.frames} frames at {width}x{height}")
        inputs = _Stage(root / "input", {**source_key, "size": [width, height]}).get(
            lambda: (_cover(f, width, height) for f in _source_frames(video, spec)))
        fps = fps or _source_fps(video)
        lineart_images = _annotate(inputs, lineart, root / "lineart", {**source_key, "size": [width, height]})

        tile_images = inputs
        if editing:
            say(f"stage 1 of 2 (editing): {edit_w}x{edit_h}, {edit_steps} steps, cross-frame attention")
            tile_images = _stage_one(models, inputs, root, source_key, edit_prompt, edit_negative_prompt,
                                     edit_w, edit_h, edit_softedge_controlnet, edit_softedge,
                                     edit_depth_controlnet, edit_depth, edit_scales, edit_steps, edit_strength,
                                     edit_cfg_scale, edit_clip_skip, edit_context_length, edit_context_stride,
                                     edit_smoother_obj, edit_smoother_steps, seed, restart, vae_batch, tiled_vae,
                                     progress, _stage_windows(on_window, "edit"))
            say("stage 2 of 2 (toon shading)")
        tile_images = _annotate(tile_images, tile, root / "tile", {**source_key, "size": [width, height],
                                                                   "edit": edit_prompt})
        units = [_unit(lineart_controlnet, lineart_images, lineart_scale)]
        if tile_controlnet is not None:
            units.append(_unit(tile_controlnet, tile_images, tile_scale))
        main = VideoPipeline(models)
        result = main(prompt, negative_prompt, init_video=inputs, strength=strength, width=width, height=height,
                      sigmas=ddim_sigmas(models.family.for_motion(), steps, strength), sampler="ddim",
                      cfg_scale=cfg_scale, clip_skip=clip_skip, seed=seed, controlnets=units,
                      context_length=context_length, context_stride=context_stride, smoother=main_smoother,
                      smoother_steps=main_smoother_steps, work_dir=root / "stage2", restart=restart,
                      output=None if output is None else str(output), fps=fps, vae_batch=vae_batch,
                      tiled_vae=tiled_vae, progress=progress, on_window=_stage_windows(on_window, "toon"))
        if output is not None and str(output).lower().endswith((".mp4", ".mov", ".mkv", ".m4v")):
            note = copy_audio(video, str(output), spec.start, plan.frames, fps)
            if note:
                say(note)
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()


def _stage_one(models, inputs, root, source_key, prompt, negative, width, height, softedge_controlnet, softedge,
               depth_controlnet, depth, scales, steps, strength, cfg_scale, clip_skip, context_length,
               context_stride, smoother, smoother_steps, seed, restart, vae_batch, tiled_vae, progress,
               on_window=None) -> list[str]:
    """The editing branch's colour video at (width, height), as frame files (the tile ControlNet's input)."""
    from diffstudio.video.render import VideoPipeline

    key = {**source_key, "size": [width, height]}
    small = _Stage(root / "edit_input", key).get(
        lambda: (_cover(np.asarray(Image.open(p).convert("RGB")), width, height) for p in inputs))
    units = []
    if softedge_controlnet is not None:
        units.append(_unit(softedge_controlnet, _annotate(small, softedge, root / "edit_softedge", key), scales[0]))
    if depth_controlnet is not None:
        if callable(depth) or isinstance(depth, str) and depth in ANNOTATORS:  # else a depth video
            depth_images = _annotate(small, depth, root / "edit_depth", key)
        else:
            depth_images = _frames_of(depth, width, height, root / "edit_depth_video",
                                      {"depth": _digest(depth), "size": [width, height]})
            if len(depth_images) < len(small):
                raise MissingDepthError(f"the depth video has {len(depth_images)} frames, the input {len(small)}: "
                                        "give one depth frame per input frame (after the frame range)")
        units.append(_unit(depth_controlnet, depth_images, scales[1]))
    frame_models = _without_motion(models)
    out = root / "stage1"
    VideoPipeline(frame_models)(
        prompt, negative, init_video=small, strength=strength, width=width, height=height,
        sigmas=ddim_sigmas(frame_models.family, steps, strength), sampler="ddim", cfg_scale=cfg_scale,
        clip_skip=clip_skip, seed=seed, controlnets=units, context_length=context_length,
        context_stride=context_stride, same_noise=True, cross_frame_attention=True, smoother=smoother,
        smoother_steps=smoother_steps, work_dir=root / "stage1_state", restart=restart, output=str(out),
        vae_batch=vae_batch, tiled_vae=tiled_vae, progress=progress, on_window=on_window)
    from diffstudio.video.video_io import list_frame_files

    return list_frame_files(str(out))


def _stage_windows(on_window, stage: str):
    """VideoPipeline's ``on_window(step, steps, window, windows)`` of one stage, reported with its name."""
    if on_window is None:
        return None
    return lambda step, steps, window, windows: on_window(stage, step, steps, window, windows)


def _window_count(frames: int, length: int, stride: int) -> int:
    from diffstudio.video.context import context_windows

    return len(context_windows(frames, length, stride))


def _smoother_label(smoother, steps) -> str | None:
    if smoother is None:
        return None
    d = smoother.describe()
    return f"FastBlend {d.get('mode')} window {d.get('window_size')} at steps {list(steps)}"


def _plan(models, video, spec, width, height, steps, cfg_scale, length, stride, controlnets, smoother,
          smoother_steps, vae_batch, fps) -> ToonPlan:
    frames = count_frames(video, spec)
    if frames == 0:
        raise InvalidInputError(f"the frame range start={spec.start}, end={spec.end} selects no frame of the input")
    windows = _window_count(frames, length, stride)
    names = [("lineart", "tile")[i] for i in range(len(controlnets))]
    stage = StagePlan("toon shading", width, height, steps, windows, min(length, frames),
                      cfg_scale != 1, names, True, _smoother_label(smoother, smoother_steps))
    loaded = [c for c in controlnets if not isinstance(c, (str, os.PathLike))]
    weights = _weights_bytes([m for m in models.components.values()] + loaded)
    weights += sum(Path(c).stat().st_size for c in controlnets if isinstance(c, (str, os.PathLike))
                   and Path(c).is_file())
    dtype_bytes = 2 if str(models.dtype) in ("torch.float16", "torch.bfloat16") else 4
    rows = min(length, frames) * (2 if cfg_scale != 1 else 1)
    memory = estimate_memory_gib(width, height, rows, weights, dtype_bytes, vae_batch)
    return ToonPlan(frames, fps or _source_fps(video), [stage], memory, weights / 2**30)


def _source_fps(video) -> float | None:
    from diffstudio.video.frames import InputVideo

    if isinstance(video, (str, os.PathLike)) and os.path.isfile(video):
        return InputVideo(str(video)).fps
    return None


def _digest(video) -> str:
    from diffstudio.video.frames import fingerprint

    return fingerprint(video if not isinstance(video, os.PathLike) else str(video))


def copy_audio(source, target: str, start_frame: int, frames: int, fps: float | None) -> str | None:
    """Copy the input file's first audio stream into the written video, trimmed to the rendered frame range,
    without re-encoding. Returns a note when there was audio that could not be copied (None otherwise)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        return None
    import av

    with av.open(str(source)) as probe:
        if not probe.streams.audio:
            return None
    if not fps:
        return "diffutoon: the input's audio was not copied (its frame rate is unknown)"
    begin, end = start_frame / fps, (start_frame + frames) / fps
    partial = target + ".audio-partial" + os.path.splitext(target)[1]
    try:
        with av.open(str(source)) as src, av.open(target) as rendered, av.open(partial, "w") as out:
            video_in, audio_in = rendered.streams.video[0], src.streams.audio[0]
            video_out = out.add_stream_from_template(video_in)
            audio_out = out.add_stream_from_template(audio_in)
            for packet in rendered.demux(video_in):
                if packet.dts is None:
                    continue
                packet.stream = video_out
                out.mux(packet)
            shift = None
            for packet in src.demux(audio_in):
                if packet.pts is None:
                    continue
                seconds = float(packet.pts * audio_in.time_base)
                if seconds < begin or seconds >= end:
                    continue
                if shift is None:
                    shift = packet.pts
                packet.pts -= shift
                packet.dts = None if packet.dts is None else packet.dts - shift
                packet.stream = audio_out
                out.mux(packet)
        os.replace(partial, target)
    except Exception as err:  # noqa: BLE001 - the video stays as written, and the user is told why
        if os.path.exists(partial):
            os.unlink(partial)
        return f"diffutoon: the input's audio was not copied ({type(err).__name__}: {err}); the video has none"
    return None


__all__ = ["DiffutoonSetupError", "InputSpec", "MissingDepthError", "SMOOTHER_PRESETS", "ToonPlan",
           "WindowTooLongError", "copy_audio", "ddim_sigmas", "ddim_timesteps", "estimate_memory_gib",
           "render_size", "round_size", "toon_shade"]
