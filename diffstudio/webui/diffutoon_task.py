"""Diffutoon toon shading (docs/diffutoon.md, the main pass) as a queued, resumable job.

The checkpoint, motion module and ControlNets are names in the server's catalog; the input video is a file
(the web UI's upload), a video file's bytes or a list of frames (the HTTP API's base64). Every intermediate
lives in ``OUTPUTS/work/<job id>/`` (the input as ``source.<ext>`` or the folder ``source/``, the annotated
control frames, the render's sampler state after every step), so a job that was cancelled or failed continues
from where it stopped when a new job is queued with ``resume=<its id>`` and the same settings (the render's own
recipe check refuses others). ``job.step`` counts context windows over all sampling steps (per-window
progress); Cancel stops after the next window.

Only the main toon-shading pass runs as a job; the editing branch (``edit_prompt``, its softedge and depth
ControlNets) is the Python API's and ``diffstudio diffutoon``'s."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffstudio.control.names import ANNOTATORS
from diffstudio.errors import InvalidInputError
from diffstudio.webui.video_jobs import check_resume, check_size, work_folder
from diffstudio.webui.video_task import video_output_name

SMOOTHERS = ("accurate", "fast", "none")
# the task's ControlNet fields (catalog names): the main pass's two, then the editing branch's
CONTROLNETS = ("lineart_controlnet", "tile_controlnet", "edit_softedge_controlnet", "edit_depth_controlnet")
SOURCE = "source"  # the input's stem in the work folder (a render's recipe fingerprints the name too)


@dataclass
class DiffutoonTask:
    """model / motion / lineart_controlnet / tile_controlnet: catalog names (tile optional). video: a video file's
    path, its bytes with ``video_format`` (its extension), or a list of frames (PIL images). ``resume``: the id
    of an interrupted or failed Diffutoon job whose work folder to continue (its input is reused; ``video`` may
    then be left out). Sizes of 0 keep the input's (rounded to multiples of 64); the other defaults are the
    paper's."""

    model: str
    motion: str
    lineart_controlnet: str
    prompt: str
    negative_prompt: str = ""
    video: str | bytes | list | None = field(default=None, repr=False)
    video_format: str = "mp4"
    tile_controlnet: str | None = None
    lineart: str = "lineart"
    tile: str | None = None
    lineart_scale: float = 0.5
    tile_scale: float = 0.5
    width: int = 0
    height: int = 0
    start: int = 0
    end: int | None = None
    steps: int = 10
    cfg_scale: float = 7.0
    clip_skip: int = 2
    strength: float = 1.0
    seed: int = 0
    context_length: int = 16
    context_stride: int = 8
    smoother: str = "accurate"
    fps: float = 0.0
    edit_prompt: str = ""  # not empty: the editing branch (stage 1 recolours, the tile ControlNet then follows it)
    edit_softedge_controlnet: str | None = None
    edit_softedge: str = "softedge"
    edit_depth_controlnet: str | None = None
    edit_depth: str = "depth"
    edit_size: int = 512
    resume: str | None = None
    work_id: str | None = None  # set by check(): the work folder ``resume`` continues (None: this job's own)

    def check(self, state) -> None:
        """Refuse what cannot run before the job is queued (named errors; only the input's first frame is read)."""
        from diffstudio.video.diffutoon import InputSpec

        catalog = state.catalog
        catalog.checkpoint(self.model)
        catalog.motion_module(self.motion)
        for name in CONTROLNETS:
            if getattr(self, name):
                catalog.controlnet(getattr(self, name))
        if not self.prompt.strip():
            raise InvalidInputError("a Diffutoon job needs a prompt")
        annotators = [("lineart", self.lineart), ("tile", self.tile)]
        if self.edit_prompt.strip():
            if not self.tile_controlnet:
                raise InvalidInputError("the editing branch hands its video to the tile ControlNet: choose one")
            annotators += [("edit softedge", self.edit_softedge if self.edit_softedge_controlnet else None),
                           ("edit depth", self.edit_depth if self.edit_depth_controlnet else None)]
            check_size(state.limits, self.edit_size, self.edit_size, 64, self.steps)
        for what, name in annotators:
            if name is not None and name not in ANNOTATORS:
                raise InvalidInputError(f"unknown {what} annotator {name!r}; choose one of {', '.join(ANNOTATORS)} "
                                        f"(tile: none = the frame itself)")
            if name is not None:
                from diffstudio.control.annotators import check_weight_files

                check_weight_files(name)  # a missing weight file is named before the job is queued
        if self.smoother not in SMOOTHERS:
            raise InvalidInputError(f"unknown smoother {self.smoother!r}; choose one of {', '.join(SMOOTHERS)}")
        if not 1 <= self.context_stride <= self.context_length:
            raise InvalidInputError(f"context windows need 1 <= stride <= length, got length {self.context_length}, "
                                    f"stride {self.context_stride}")
        if not 0 < self.strength <= 1 or self.cfg_scale < 0 or self.clip_skip < 1 or self.fps < 0 or self.steps < 1:
            raise InvalidInputError("strength must be in (0, 1], steps and clip skip at least 1, CFG and fps not "
                                    "negative")
        InputSpec(None, self.start, self.end)
        check_size(state.limits, self.width, self.height, 64, self.steps)
        if self.resume is not None:
            self.work_id = check_resume(state, "diffutoon", self.resume)
        elif self.video is None:
            raise InvalidInputError("a Diffutoon job needs an input video (or resume= an earlier job's id)")
        if isinstance(self.video, list):
            from diffstudio.server.payloads import check_pixels

            if not self.video:
                raise InvalidInputError("the input frames are an empty list")
            for i, frame in enumerate(self.video):
                check_pixels(*frame.size, state.limits.max_pixels, f"input frame {i}")
        elif self.video is not None:
            self._check_video(state.limits.max_pixels)

    def _check_video(self, max_pixels: int) -> None:
        """The input opens as a video and its frames are within the pixel limit."""
        from diffstudio.server.payloads import check_pixels
        from diffstudio.video import video_io
        from diffstudio.video.frames import InputVideo

        suffix = f".{self.video_format.lower().lstrip('.')}"
        if suffix not in video_io.VIDEO_EXTENSIONS:
            raise InvalidInputError(f"video_format {self.video_format!r} is not one of "
                                    f"{', '.join(e[1:] for e in video_io.VIDEO_EXTENSIONS)}")
        with tempfile.TemporaryDirectory(prefix="diffstudio-upload-") as scratch:
            path = self._write_source(Path(scratch)) if isinstance(self.video, bytes) else self.video
            video_io.check_source(str(path), "input video")
            try:
                size = InputVideo(str(path)).size
            except InvalidInputError:
                raise
            except Exception as err:  # a container the decoder cannot read: the client's file, not a bug
                raise InvalidInputError(f"the input video cannot be read as {suffix[1:]} ({err})") from None
        check_pixels(*size, max_pixels, "the input video's frames")

    def _write_source(self, folder: Path) -> Path:
        """The input as ``folder/source.<ext>`` (bytes written, a file copied) or ``folder/source/`` (frames)."""
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.video, list):
            path = folder / SOURCE
            path.mkdir(exist_ok=True)
            for i, frame in enumerate(self.video):
                frame.convert("RGB").save(path / f"{i:05d}.png")
        elif isinstance(self.video, bytes):
            path = folder / f"{SOURCE}.{self.video_format.lower().lstrip('.')}"
            path.write_bytes(self.video)
        else:
            path = folder / f"{SOURCE}{Path(self.video).suffix.lower()}"
            shutil.copyfile(self.video, path)
        return path

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "video"}

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.video.diffutoon import toon_shade

        folder = work_folder(outputs, self.work_id or job.id)
        existing = sorted(folder.glob(f"{SOURCE}*"))
        source = existing[0] if existing and self.work_id else self._write_source(folder)
        pipe = cache.pipeline(self.model)
        models = pipe.models.clone()  # the motion module goes on the clone: the cached model stays an image model
        models.add_motion_module(cache.catalog.motion_module(self.motion).path)
        controlnet = cache.catalog.controlnet
        job.check_stop()
        arguments = self.arguments({name: str(controlnet(getattr(self, name)).path) if getattr(self, name) else None
                                    for name in CONTROLNETS})
        progress = WindowProgress(job)
        name = video_output_name(job.id)
        toon_shade(models, str(source), self.prompt, self.negative_prompt, output=str(outputs / name),
                   work_dir=folder / "render", progress=False, on_window=progress, **arguments)
        job.outputs.append(name)
        job.info = {**job.info, "work_folder": folder.name, "resumed_from": self.resume}

    def arguments(self, controlnet_paths: dict[str, str | None]) -> dict:
        """``toon_shade``'s settings for this task (models, input and output aside); ``controlnet_paths``: the
        files of the ``CONTROLNETS`` fields (None where not given)."""
        editing = bool(self.edit_prompt.strip())
        edit = dict(edit_prompt=self.edit_prompt, edit_size=self.edit_size, edit_softedge=self.edit_softedge,
                    edit_depth=self.edit_depth, **{name: controlnet_paths[name] for name in CONTROLNETS[2:]})
        return dict(width=self.width or None, height=self.height or None, start=self.start, end=self.end,
                    lineart=self.lineart, lineart_scale=self.lineart_scale, tile=self.tile,
                    tile_scale=self.tile_scale, steps=self.steps, cfg_scale=self.cfg_scale, clip_skip=self.clip_skip,
                    strength=self.strength, seed=self.seed, context_length=self.context_length,
                    context_stride=self.context_stride, smoother=None if self.smoother == "none" else self.smoother,
                    fps=self.fps or None, **{name: controlnet_paths[name] for name in CONTROLNETS[:2]},
                    **(edit if editing else {}))


class WindowProgress:
    """``toon_shade``'s ``on_window``: ``job.step`` counts context windows over the sampling steps (those a resumed
    render skips included, so progress continues where it stopped), ``job.steps`` the whole render's (known from
    its first window on); Cancel is honoured after each window (the state of the last whole step stays in the
    work folder)."""

    def __init__(self, job):
        self.job = job

    def __call__(self, stage: str, step: int, steps: int, window: int, windows: int) -> None:
        self.job.steps = steps * windows
        self.job.step = step * windows + window
        self.job.check_stop()
