"""The video jobs of diffstudio's own API beyond AnimateDiff: ``POST /v1/svd`` (Stable Video Diffusion, image to
video, with ExVideo extensions), ``POST /v1/cogvideox`` (text to video; image to video with an I2V model) and
``POST /v1/diffutoon`` (toon shading of a video, resumable).

Each answers 202 with a job id on the bounded queue (429 when it is full) or a named 4xx error before anything
is queued; ``GET /v1/jobs/{id}`` reports progress (and a preview of the first frame with ``preview_every``), the
output is ``/v1/outputs/<job id>.mp4``. Model names are catalog names (``GET /v1/models``: ``video_models``,
``exvideo_extensions``, ``motion_modules``, ``controlnets``); images and videos travel as base64. The web UI's
Video tab queues the same tasks (``diffstudio.webui.video_model_tasks``, ``diffutoon_task``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from diffstudio.control.names import ANNOTATORS
from diffstudio.errors import InvalidInputError
from diffstudio.server.a1111 import SEED_END
from diffstudio.server.payloads import decode_bytes, decode_image
from diffstudio.server.v1 import Strict
from diffstudio.webui.animatediff_task import MAX_FRAMES

router = APIRouter(prefix="/v1", tags=["diffstudio video"])


def _queued(job) -> dict:
    return {"id": job.id, "state": job.state, "url": f"/v1/jobs/{job.id}"}


class SVDRequest(Strict):
    """Stable Video Diffusion (docs/svd.md): the first frame animated; left-out values take SVD's defaults."""

    model: str = Field(..., description="an SVD video model (GET /v1/models, video_models)")
    image: str = Field(..., description="the first frame, base64")
    extensions: list[str] = Field(default_factory=list, description="ExVideo extensions (exvideo_extensions)")
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    motion_bucket_id: int | None = None
    noise_aug_strength: float | None = None
    min_cfg: float | None = None
    max_cfg: float | None = None
    steps: int | None = None
    seed: int = Field(0, ge=0, lt=SEED_END)
    sampler: str | None = None
    scheduler: str | None = None
    decode_chunk_size: int | None = None
    preview_every: int = Field(0, ge=0, description="a preview of the first frame every that many steps")


class CogVideoXRequest(Strict):
    """CogVideoX (docs/cogvideox.md): text to video, or image to video with an I2V model (``image``)."""

    model: str = Field(..., description="a CogVideoX video model (GET /v1/models, video_models)")
    prompt: str
    negative_prompt: str = ""
    image: str | None = Field(None, description="the first frame, base64 (the I2V models need it)")
    frames: int | None = Field(None, description="4k + 1 (default 49)")
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = Field(0, ge=0, lt=SEED_END)
    dynamic_cfg: bool = False
    sampler: Literal["ddim", "dpmpp_2m"] | None = None
    fps: float | None = None
    preview_every: int = Field(0, ge=0, description="a preview of the first frame every that many steps")


class DiffutoonRequest(Strict):
    """Diffutoon's toon-shading pass (docs/diffutoon.md) over a video; resumable (``resume``)."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = Field(None, description="an SD 1.x checkpoint; default: the current one")
    motion: str = Field(..., description="a motion module (motion_modules)")
    lineart_controlnet: str = Field(..., description="the lineart ControlNet (controlnets)")
    tile_controlnet: str | None = None
    video: str | None = Field(None, description="the input video file, base64 (left out with resume)")
    frames: list[str] | None = Field(None, min_length=1, description="or the input as frames, base64 images")
    video_format: Literal["mp4", "mov", "mkv", "avi", "webm", "m4v", "gif"] = "mp4"
    lineart: Literal[ANNOTATORS] = "lineart"
    tile: Literal[ANNOTATORS] | None = None
    lineart_scale: float = 0.5
    tile_scale: float = 0.5
    width: int = Field(0, description="0: the input's (multiples of 64)")
    height: int = 0
    start: int = 0
    end: int | None = None
    steps: int = 10
    cfg_scale: float = 7.0
    clip_skip: int = 2
    strength: float = 1.0
    seed: int = Field(0, ge=0, lt=SEED_END)
    context_length: int = 16
    context_stride: int = 8
    smoother: Literal["accurate", "fast", "none"] = "accurate"
    fps: float = 0.0
    edit_prompt: str = Field("", description="not empty: the editing branch (stage 1 recolours the video at "
                                             "edit_size; needs tile_controlnet)")
    edit_softedge_controlnet: str | None = None
    edit_softedge: Literal[ANNOTATORS] = "softedge"
    edit_depth_controlnet: str | None = None
    edit_depth: Literal[ANNOTATORS] = Field("depth", description="depth: MiDaS through controlnet-aux")
    edit_size: int = 512
    resume: str | None = Field(None, description="an interrupted or failed Diffutoon job's id: continue its render")


@router.post("/svd", status_code=202)
def svd(req: SVDRequest, request: Request) -> dict:
    """Queue an SVD image-to-video job; 202 with the job id."""
    from diffstudio.webui.video_jobs import queue_video_job
    from diffstudio.webui.video_model_tasks import SVDTask

    state = request.app.state.server
    state.catalog.video_model(req.model, "svd")  # an unknown name is named before the image is decoded
    values = req.model_dump(exclude={"image"})
    task = SVDTask(image=decode_image(req.image, "image", state.limits.max_pixels), **values)
    return _queued(queue_video_job(state, "svd", task))


@router.post("/cogvideox", status_code=202)
def cogvideox(req: CogVideoXRequest, request: Request) -> dict:
    """Queue a CogVideoX job; 202 with the job id."""
    from diffstudio.webui.video_jobs import queue_video_job
    from diffstudio.webui.video_model_tasks import CogVideoXTask

    state = request.app.state.server
    state.catalog.video_model(req.model, "cogvideox")
    image = None if req.image is None else decode_image(req.image, "image", state.limits.max_pixels)
    task = CogVideoXTask(image=image, **req.model_dump(exclude={"image"}))
    return _queued(queue_video_job(state, "cogvideox", task))


@router.post("/diffutoon", status_code=202)
def diffutoon(req: DiffutoonRequest, request: Request) -> dict:
    """Queue a Diffutoon job; 202 with the job id (its work folder is kept for ``resume``)."""
    from diffstudio.webui.diffutoon_task import DiffutoonTask
    from diffstudio.webui.video_jobs import queue_video_job

    state = request.app.state.server
    if req.video is not None and req.frames is not None:
        raise InvalidInputError("give the input as video or as frames, not both")
    model = state.catalog.checkpoint(req.model or state.options["sd_model_checkpoint"]).name
    video = None if req.video is None else decode_bytes(req.video, "video", "video file")
    if req.frames is not None:
        if len(req.frames) > MAX_FRAMES:
            raise InvalidInputError(f"{len(req.frames)} frames; a job takes at most {MAX_FRAMES} (send a video file)")
        video = [decode_image(f, f"frames[{i}]", state.limits.max_pixels) for i, f in enumerate(req.frames)]
    task = DiffutoonTask(**{**req.model_dump(exclude={"video", "frames", "model"}), "model": model, "video": video})
    return _queued(queue_video_job(state, "diffutoon", task))
