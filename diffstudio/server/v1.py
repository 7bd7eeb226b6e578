"""diffstudio's own API (``/v1``): the full request (regions, ControlNet units, LoRAs, an IP-Adapter image
prompt) as a queued job.

``POST /v1/generate`` answers 202 with a job id at once; ``GET /v1/jobs/{id}`` reports its state, progress
and outputs; ``POST /v1/animatediff`` queues an AnimateDiff video (SVD, CogVideoX and Diffutoon jobs:
``v1_video.py``); ``GET /v1/outputs/{name}`` serves an output PNG or MP4. Names of models, LoRAs, ControlNets,
IP-Adapters and motion modules are catalog names (``GET /v1/models``), never paths; images travel as base64.
"""

from __future__ import annotations

import random
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from diffstudio.control.names import ANNOTATORS
from diffstudio.server.a1111 import SEED_END
from diffstudio.server.checks import check_counts, check_lora_tags, sampler_and_scheduler
from diffstudio.server.jobs import Job
from diffstudio.server.payloads import decode_image, encode_bytes
from diffstudio.server.runner import GenerationSpec

router = APIRouter(prefix="/v1", tags=["diffstudio"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RegionSpec(Strict):
    """A prompt for one area: a box (x0, y0, x1, y1 in fractions, (0, 0) = top-left) or a base64 mask."""

    prompt: str
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    mask: str | None = None
    weight: float = 1.0
    negative_prompt: str | None = None
    feather: float = 0.0


class ControlNetSpec(Strict):
    """A ControlNet unit: the ControlNet by catalog name, its control image as base64."""

    model: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: Literal[ANNOTATORS] | None = Field(
        None, description="an annotator run on the image first; those with weight files read them from the "
                          "server's annotator folder (serve --annotators)")
    control_mode: Literal["balanced", "prompt", "control"] = "balanced"
    mode: str | int | None = Field(None, description="union ControlNets: what the control image is (canny, depth ...)")


class IPAdapterSpec(Strict):
    """An image prompt: the IP-Adapter by catalog name, its reference images as base64 (docs/ipadapter.md)."""

    name: str
    images: list[str] = Field(..., min_length=1, description="base64; several are averaged (weights)")
    scale: float = 0.7
    start: float = 0.0
    end: float = 1.0
    weights: list[float] | None = None
    style_only: bool = False


class LoRASpec(Strict):
    """A LoRA by catalog name; the same as ``<lora:name:strength>`` in the prompt."""

    name: str
    strength: float = 1.0


class GenerateRequest(Strict):
    """One generation; left-out values take the model's defaults (docs/server.md)."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = Field(None, description="a checkpoint name (GET /v1/models); default: the current one")
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance: float | None = None
    seed: int = Field(0, ge=-1, lt=SEED_END, description="-1 = a random seed (the job reports it)")
    sampler: str | None = Field(None, description="ours (euler_ancestral) or A1111's (Euler a)")
    scheduler: str | None = None
    batch_size: int = 1
    batches: int = Field(1, description="runs of batch_size images, the seed advancing by batch_size")
    clip_skip: int | None = None
    tiled_vae: bool | None = None
    init_image: str | None = Field(None, description="base64; img2img")
    strength: float | None = None
    mask: str | None = Field(None, description="base64, white = repaint; needs init_image")
    regions: list[RegionSpec] | None = None
    region_mode: Literal["latent", "attention"] = "latent"
    global_weight: float | None = None
    controlnets: list[ControlNetSpec] = Field(default_factory=list)
    loras: list[LoRASpec] = Field(default_factory=list)
    ip_adapter: IPAdapterSpec | None = None
    ip_adapters: list[IPAdapterSpec] = Field(default_factory=list, description="several image prompts (each "
                                             "its own adapter, images and scale), with or after ip_adapter")
    preview_every: int = Field(0, ge=0, description="a preview of the image every that many steps (0 = none): "
                                                      "GET /v1/jobs/{id} and /sdapi/v1/progress send the latest")


def _spec(req: GenerateRequest, state) -> GenerationSpec:
    from diffstudio.pipeline.control import ControlNetUnit
    from diffstudio.pipeline.regions import Region, RegionLayout

    limit = state.limits.max_pixels
    model = state.catalog.checkpoint(req.model or state.options["sd_model_checkpoint"]).name
    sampler, scheduler = sampler_and_scheduler(req.sampler, req.scheduler)
    check_counts(state.limits, req.width, req.height, req.steps, req.batch_size, req.batches)
    prompt = req.prompt + "".join(f" <lora:{lora.name}:{lora.strength:g}>" for lora in req.loras)
    check_lora_tags(state.catalog, prompt, req.negative_prompt)
    regions = None
    if req.regions:
        regions = [Region(r.prompt, mask=None if r.mask is None else decode_image(r.mask, f"regions[{i}].mask", limit),
                          box=r.box, weight=r.weight, negative_prompt=r.negative_prompt, feather=r.feather)
                   for i, r in enumerate(req.regions)]
        if req.global_weight is not None:
            regions = RegionLayout(regions, global_weight=req.global_weight)
    from diffstudio.control.annotators import check_weight_files

    for c in req.controlnets:
        if c.preprocess:
            check_weight_files(c.preprocess)
    units = [ControlNetUnit(str(state.catalog.controlnet(c.model).path),
                            decode_image(c.image, f"controlnets[{i}].image", limit), scale=c.scale, start=c.start,
                            end=c.end, preprocess=c.preprocess, control_mode=c.control_mode, mode=c.mode)
             for i, c in enumerate(req.controlnets)]
    specs = [("ip_adapter", req.ip_adapter)] if req.ip_adapter is not None else []
    specs += [(f"ip_adapters[{i}]", spec) for i, spec in enumerate(req.ip_adapters)]
    references = sum(len(spec.images) for _, spec in specs)
    if references > state.limits.max_images:
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError(f"the image prompts hold {references} reference images; this server takes at most "
                                f"{state.limits.max_images} in one request")
    image_prompts = [_image_prompt(spec, state, where) for where, spec in specs]
    images = {name: None if data is None else decode_image(data, name, limit)
              for name, data in (("init_image", req.init_image), ("mask", req.mask))}
    return GenerationSpec(model, {
        "prompt": prompt, "negative_prompt": req.negative_prompt, "width": req.width, "height": req.height,
        "steps": req.steps, "cfg_scale": req.cfg_scale, "guidance": req.guidance,
        "seed": random.randrange(2**32) if req.seed == -1 else req.seed, "sampler": sampler,
        "scheduler": scheduler, "batch_size": req.batch_size, "clip_skip": req.clip_skip, "tiled_vae": req.tiled_vae,
        "strength": req.strength, "regions": regions, "region_mode": req.region_mode, **images},
        batches=req.batches, controlnets=units, ip_adapters=image_prompts, preview_every=req.preview_every)


def _image_prompt(spec: IPAdapterSpec, state, where: str = "ip_adapter"):
    """The ImagePrompt of ``spec`` (its checks are ImagePrompt's), the adapter a path from the catalog; ``where``
    names it in errors."""
    from diffstudio.errors import InvalidInputError
    from diffstudio.pipeline.ip_adapter import ImagePrompt

    entry = state.catalog.ip_adapter(spec.name)
    if len(spec.images) > state.limits.max_images:
        raise InvalidInputError(f"{where}.images holds {len(spec.images)} images; this server takes at most "
                                f"{state.limits.max_images}")
    images = [decode_image(data, f"{where}.images[{i}]", state.limits.max_pixels)
              for i, data in enumerate(spec.images)]
    return ImagePrompt(images, scale=spec.scale, weights=spec.weights, style_only=spec.style_only, start=spec.start,
                       end=spec.end, model=str(entry.path))


@router.post("/generate", status_code=202)
def generate(req: GenerateRequest, request: Request) -> dict:
    """Queue a generation; 202 with the job id (429 with Retry-After when the queue is full)."""
    job = queue_generation(req, request.app.state.server)
    return {"id": job.id, "state": job.state, "url": f"/v1/jobs/{job.id}"}


def queue_generation(req: GenerateRequest, state) -> Job:
    """Check ``req``, turn it into a GenerationSpec and queue it (the web UI queues its jobs here too)."""
    spec = _spec(req, state)
    params = req.model_dump(exclude={"init_image", "mask"})
    params["seed"] = spec.request["seed"]
    for key, items in (("regions", params.get("regions")), ("controlnets", params.get("controlnets"))):
        for item in items or ():
            item.pop("mask" if key == "regions" else "image", None)
    for prompt in [params.get("ip_adapter"), *params.get("ip_adapters", [])]:
        if prompt:
            prompt.pop("images")
    return state.submit("generate", params, spec)


class AnimateDiffRequest(Strict):
    """An AnimateDiff text-to-video job (docs/animatediff.md): a checkpoint and a motion module by catalog name;
    sizes, steps and CFG left out take the model's defaults. The output is ``/v1/outputs/<job id>.mp4``."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = Field(None, description="a checkpoint name (GET /v1/models); default: the current one")
    motion: str = Field(..., description="a motion module name (GET /v1/models, motion_modules)")
    frames: int = 16
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = 0
    context_length: int = 16
    fps: float = 8.0
    context_dilation: int = Field(1, description="a window's frames lie this many apart (docs/animatediff.md)")


@router.post("/animatediff", status_code=202)
def animatediff(req: AnimateDiffRequest, request: Request) -> dict:
    """Queue an AnimateDiff video; 202 with the job id (the web UI's Video tab queues the same task)."""
    from diffstudio.webui.animatediff_task import AnimateDiffTask

    state = request.app.state.server
    model = state.catalog.checkpoint(req.model or state.options["sd_model_checkpoint"]).name
    task = AnimateDiffTask(model, req.motion, req.prompt, req.negative_prompt, req.frames, req.width or 0,
                           req.height or 0, req.steps or 0, req.cfg_scale or 0.0, req.seed, req.context_length, req.fps,
                           req.context_dilation)
    task.check(state.catalog)
    job = state.jobs.submit(Job.new("animatediff", task.params(), task))
    return {"id": job.id, "state": job.state, "url": f"/v1/jobs/{job.id}"}


@router.get("/jobs/{job_id}")
def job_status(job_id: str, request: Request, preview: bool = True) -> dict:
    """State (queued, running, done, failed, interrupted), progress 0..1, outputs and their URLs, the error, and
    the latest preview (base64 PNG, with the step it shows) of a job that asked for previews (``preview=false``:
    left out)."""
    job = request.app.state.server.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} on this server")
    latest = job.preview if preview else None
    return {**job.public(), "urls": [f"/v1/outputs/{name}" for name in job.outputs],
            "preview": None if latest is None else encode_bytes(latest.png),
            "preview_step": None if latest is None else latest.step}


@router.delete("/jobs/{job_id}")
def cancel_job(job_id: str, request: Request) -> dict:
    """Stop a job: a queued one never runs, a running one stops at its next step."""
    job = request.app.state.server.jobs.interrupt(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} on this server")
    return {"id": job.id, "state": job.state}


@router.get("/outputs/{name}")
def output(name: str, request: Request) -> FileResponse:
    """An output by name: a PNG (``<job id>-<n>.png``) or a video job's MP4 (``<job id>.mp4``); nothing else under
    the outputs folder is served."""
    path = request.app.state.server.output_path(name)
    return FileResponse(path, media_type="video/mp4" if path.suffix == ".mp4" else "image/png")


@router.get("/models")
def models(request: Request) -> dict:
    """The catalog: checkpoints (with the current one and those loaded), LoRAs, ControlNets, IP-Adapters, motion
    modules, video models (SVD, CogVideoX) and ExVideo extensions."""
    state = request.app.state.server
    catalog = state.catalog
    return {"checkpoints": [{"name": e.name, "family": e.family} for e in catalog.checkpoints.values()],
            "current": state.options["sd_model_checkpoint"], "loaded": state.cache.loaded,
            "loras": sorted(catalog.loras), "controlnets": sorted(catalog.controlnets),
            "ip_adapters": sorted(catalog.ip_adapters), "motion_modules": sorted(catalog.motion_modules),
            "video_models": [{"name": e.name, "family": e.family} for e in catalog.video_models.values()],
            "exvideo_extensions": sorted(catalog.exvideo_extensions)}


@router.get("/status")
def status(request: Request) -> dict:
    """The queue: the running job, how many wait, the queue's size."""
    jobs = request.app.state.server.jobs
    current = jobs.current
    return {"running": None if current is None else current.id, "waiting": jobs.waiting, "queue_size": jobs.size}
