"""Stable Video Diffusion (image-to-video, with ExVideo extensions) and CogVideoX (text-to-video and, with an I2V
model, image-to-video) as queued jobs. The model is a video model of the server's catalog, loaded through the
shared model cache; the render is the Python API's (``SVDPipeline``, ``CogVideoPipeline``) with the same
arguments, written to ``OUTPUTS/<job id>.mp4``. ``job.step`` counts the sampling steps, ``preview_every`` gives
a preview of the first frame's x0 estimate, and Cancel stops at the next step. Neither pipeline keeps a state
between steps on disk, so these jobs are not resumable (a stopped one is submitted again)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffstudio.errors import InvalidInputError
from diffstudio.webui.animatediff_task import MAX_FRAMES
from diffstudio.webui.video_jobs import check_size, step_callback
from diffstudio.webui.video_task import video_output_name


def _given(**values) -> dict:
    """The arguments a task sets (None: the pipeline's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _check_common(task, limits, multiple: int) -> None:
    check_size(limits, task.width or 0, task.height or 0, multiple, task.steps or 0)
    if task.fps is not None and task.fps <= 0:
        raise InvalidInputError(f"fps must be positive, got {task.fps}")
    if task.preview_every < 0:
        raise InvalidInputError(f"preview_every must be 0 (none) or more, got {task.preview_every}")


@dataclass
class SVDTask:
    """model: an SVD video model of the catalog; extensions: ExVideo extension names grafted onto its UNet;
    image: the first frame (PIL). None takes SVD's defaults (docs/svd.md)."""

    model: str
    image: object = field(repr=False)
    extensions: list[str] = field(default_factory=list)
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    motion_bucket_id: int | None = None
    noise_aug_strength: float | None = None
    min_cfg: float | None = None
    max_cfg: float | None = None
    steps: int | None = None
    seed: int = 0
    sampler: str | None = None
    scheduler: str | None = None
    decode_chunk_size: int | None = None
    preview_every: int = 0

    def check(self, state) -> None:
        """Refuse what cannot run before the job is queued (named errors; nothing is loaded)."""
        from diffstudio.server.checks import sampler_and_scheduler

        state.catalog.video_model(self.model, "svd")
        for name in self.extensions:
            state.catalog.exvideo_extension(name)
        if self.image is None:
            raise InvalidInputError("SVD animates an image: give the first frame")
        if self.frames is not None and not 1 <= self.frames <= MAX_FRAMES:
            raise InvalidInputError(f"frames must be 1..{MAX_FRAMES}, got {self.frames}")
        if self.motion_bucket_id is not None and self.motion_bucket_id < 0:
            raise InvalidInputError(f"motion_bucket_id must not be negative, got {self.motion_bucket_id}")
        if self.decode_chunk_size is not None and self.decode_chunk_size < 1:
            raise InvalidInputError(f"decode_chunk_size must be at least 1, got {self.decode_chunk_size}")
        self.sampler, self.scheduler = sampler_and_scheduler(self.sampler, self.scheduler)
        _check_common(self, state.limits, 8)

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "image"}

    def arguments(self) -> dict:
        """``SVDPipeline.__call__``'s keyword arguments for this task (the image aside)."""
        return _given(num_frames=self.frames, width=self.width, height=self.height, fps=self.fps,
                      motion_bucket_id=self.motion_bucket_id, noise_aug_strength=self.noise_aug_strength,
                      min_cfg=self.min_cfg, max_cfg=self.max_cfg, steps=self.steps, seed=self.seed,
                      sampler=self.sampler, scheduler=self.scheduler, decode_chunk_size=self.decode_chunk_size)

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.video.svd import SVDPipeline

        models = cache.video_models(self.model, "svd", tuple(self.extensions))
        job.check_stop()
        name = video_output_name(job.id)
        SVDPipeline(models)(self.image, output=str(outputs / name), progress=False,
                            callback=step_callback(job, self.preview_every, lambda x0: svd_preview(models, x0)),
                            **self.arguments())
        job.outputs.append(name)
        job.info = {**job.info, "model": self.model, "extensions": list(self.extensions)}


def svd_preview(models, x0):
    """The first frame of an SVD x0 estimate (1, T, 4, h, w), decoded alone by the temporal VAE."""
    import torch
    from PIL import Image

    from diffstudio.families.svd import SVD

    family = getattr(models, "family", None) or SVD
    with torch.inference_mode():
        frame = next(iter(models.vae.decode_chunks(family.latent.from_model(x0[0, :1].float()), 1)))
    pixels = ((frame[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


@dataclass
class CogVideoXTask:
    """model: a CogVideoX video model of the catalog; image: the first frame for the image-to-video models (PIL,
    None for text-to-video). None takes the pipeline's defaults (docs/cogvideox.md)."""

    model: str
    prompt: str
    negative_prompt: str = ""
    image: object = field(default=None, repr=False)
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = 0
    dynamic_cfg: bool = False
    sampler: str | None = None
    fps: float | None = None
    preview_every: int = 0

    def check(self, state) -> None:
        from diffstudio.sampling.zero_snr import SAMPLERS_V
        from diffstudio.video.cogvideo import latent_frames

        state.catalog.video_model(self.model, "cogvideox")
        if not self.prompt.strip():
            raise InvalidInputError("a CogVideoX job needs a prompt")
        if self.frames is not None:
            latent_frames(self.frames)  # 4k + 1, else FrameCountError
            if self.frames > MAX_FRAMES:
                raise InvalidInputError(f"frames must be at most {MAX_FRAMES}, got {self.frames}")
        if self.sampler is not None and self.sampler not in SAMPLERS_V:
            raise InvalidInputError(f"unknown CogVideoX sampler {self.sampler!r}; choose one of "
                                    f"{', '.join(SAMPLERS_V)}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise InvalidInputError(f"cfg_scale must not be negative, got {self.cfg_scale}")
        _check_common(self, state.limits, 16)

    def params(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "image"}, "image": self.image is not None}

    def arguments(self) -> dict:
        """``CogVideoPipeline.__call__``'s keyword arguments for this task (prompts and image aside)."""
        return _given(num_frames=self.frames, width=self.width, height=self.height, steps=self.steps,
                      cfg_scale=self.cfg_scale, seed=self.seed, use_dynamic_cfg=self.dynamic_cfg,
                      sampler=self.sampler, fps=self.fps)

    def run(self, job, cache, outputs: Path) -> None:
        from diffstudio.video.cogvideo import CogVideoPipeline, latent_frames

        pipe = CogVideoPipeline(cache.video_models(self.model, "cogvideox"))
        job.check_stop()
        patch_t = pipe.transformer.config.patch_size_t
        pad = (-latent_frames(self.frames or 49)) % patch_t if patch_t else 0  # 1.5's padding frame in front

        def preview(x0):
            return pipe.decode(x0[:, pad:pad + 1])[0]

        name = video_output_name(job.id)
        pipe(self.prompt, self.negative_prompt, image=self.image, output=str(outputs / name),
             callback=step_callback(job, self.preview_every, preview), **self.arguments())
        job.outputs.append(name)
        job.info = {**job.info, "model": self.model}
