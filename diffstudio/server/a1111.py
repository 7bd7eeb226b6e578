"""The AUTOMATIC1111 / Forge web API (``/sdapi/v1``): the routes and field names their clients use.

txt2img and img2img answer when their job has run (they wait in the same queue as ``/v1`` jobs), with the
images as base64 PNGs (recipe chunks included) and ``info`` as A1111 writes it: a JSON *string*.

Field mapping (A1111 -> diffstudio): ``sampler_name`` / ``scheduler`` display names -> ours (``"Euler a"`` ->
euler_ancestral, ``"DPM++ 2M Karras"`` -> dpmpp_2m + karras); ``seed`` -1 -> a random seed (reported in
``info``); ``n_iter`` -> batches whose seeds continue ``seed + i``; ``denoising_strength`` -> strength;
``mask`` (white = repaint), ``mask_blur`` (a Gaussian of that many pixels), ``inpainting_mask_invert``;
``override_settings.sd_model_checkpoint`` / ``CLIP_stop_at_last_layers`` -> the model / clip skip for that
request. Fields left out take the *model's* defaults (A1111 uses 512x512, 50 steps, CFG 7).

Fields that ask for something this server does not do (hires fix, face restoration, tiling, variation
seeds, styles, scripts, a refiner, "only masked" inpainting, a fill other than "original") are refused
with 422 and what to send instead. Fields A1111 clients send that change nothing here (``save_images``,
``do_not_save_grid``, ``eta`` ...) are accepted and listed in ``info["ignored_fields"]``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from PIL import ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from diffstudio.errors import InvalidInputError
from diffstudio.server.checks import check_counts, check_lora_tags, sampler_and_scheduler
from diffstudio.server.jobs import DONE, INTERRUPTED, Job
from diffstudio.server.payloads import decode_image, encode_bytes, encode_file, png_text_chunks
from diffstudio.server.runner import GenerationSpec

router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible"])

# Fields with an effect this server does not have: (field, the value that means "off").
UNSUPPORTED = {"enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0.0, "styles": [],
               "script_name": None, "refiner_checkpoint": None, "alwayson_scripts": {}}
OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "live_previews_enable", "show_progress_every_n_steps")
# The preview options' values on a new server: off (A1111 has them on; here a run pays for them only when asked).
PREVIEW_DEFAULTS = {"live_previews_enable": False, "show_progress_every_n_steps": 10}
AT_THE_END = 2**31  # show_progress_every_n_steps -1: a preview only at each batch's last step
SEED_END = 2**63  # seeds are 0 .. 2**63 - 1 (-1 = random)


class A1111Request(BaseModel):
    """The fields both A1111 generation routes share; other fields are accepted (``model_extra``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, lt=SEED_END)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = None
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True


class Txt2ImgRequest(A1111Request):
    pass


class Img2ImgRequest(A1111Request):
    init_images: list[str] = Field(..., min_length=1, max_length=1)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int | None = None
    inpaint_full_res: bool | None = None
    resize_mode: int = 0


class PngInfoRequest(BaseModel):
    image: str


# -- generation ------------------------------------------------------------------------------------

def _refuse_unsupported(req: A1111Request) -> list[str]:
    """422 for fields asking for what this server lacks; the names of the other extra fields (ignored)."""
    extra = dict(req.model_extra or {})
    for name, off in UNSUPPORTED.items():
        if name in extra and extra[name] not in (off, None, [], {}, 0, False, ""):
            raise InvalidInputError(f"{name}={extra[name]!r} is not supported by this server; leave it out or set "
                                    f"it to {off!r}")
        extra.pop(name, None)
    return sorted(extra)


def _spec(req: A1111Request, state, request: dict) -> GenerationSpec:
    """The checks and the mapping both routes share; ``request`` holds the route's own Request fields."""
    settings = {**state.options, **req.override_settings}
    unknown = sorted(set(req.override_settings) - set(OPTIONS))
    if unknown:
        raise InvalidInputError(f"override_settings {unknown} are not options of this server; known: "
                                f"{', '.join(OPTIONS)}")
    check_option_values(req.override_settings)
    model = state.catalog.checkpoint(settings["sd_model_checkpoint"]).name
    sampler, scheduler = sampler_and_scheduler(req.sampler_name or req.sampler_index, req.scheduler)
    check_counts(state.limits, req.width, req.height, req.steps, req.batch_size, req.n_iter)
    check_lora_tags(state.catalog, req.prompt, req.negative_prompt)
    seed = random.randrange(2**32) if req.seed == -1 else req.seed
    every = int(settings.get("show_progress_every_n_steps") or 0)
    preview_every = (every if every > 0 else AT_THE_END) if settings.get("live_previews_enable") else 0
    return GenerationSpec(model, {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": req.width, "height": req.height,
        "steps": req.steps, "cfg_scale": req.cfg_scale, "seed": seed, "sampler": sampler, "scheduler": scheduler,
        "batch_size": req.batch_size, "clip_skip": settings.get("CLIP_stop_at_last_layers"), **request},
        batches=req.n_iter, preview_every=preview_every)


async def _generate(kind: str, req: A1111Request, spec: GenerationSpec, state, ignored: list[str]):
    from diffstudio.server.app import job_error

    params = req.model_dump(exclude={"init_images", "mask"})
    job = await state.wait(state.submit(kind, params, spec))
    if job.state not in (DONE, INTERRUPTED):
        return job_error(job)
    images = [encode_file(state.outputs / name) for name in job.outputs] if req.send_images else []
    parameters = {**params, **({"init_images": None, "mask": None} if kind == "img2img" else {})}
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(job, spec, ignored))}


def _info(job: Job, spec: GenerationSpec, ignored: list[str]) -> dict:
    """A1111's ``info`` object, from the recipes the pipeline wrote."""
    from diffstudio.io.recipe import a1111_parameters, sampler_display_name, scheduler_display_name

    recipes = job.info.get("recipes") or []
    first = recipes[0] if recipes else {}
    return {
        "prompt": spec.request["prompt"], "all_prompts": [r["prompt"] for r in recipes],
        "negative_prompt": spec.request["negative_prompt"],
        "all_negative_prompts": [r["negative_prompt"] for r in recipes],
        "seed": spec.request["seed"], "all_seeds": [r["seed"] for r in recipes],
        "subseed": -1, "all_subseeds": [-1] * len(recipes), "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"),
        "sampler_name": sampler_display_name(first["sampler"]) if first else None,
        "cfg_scale": first.get("cfg_scale"), "steps": first.get("steps"), "batch_size": spec.request["batch_size"],
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": Path(spec.model).stem,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.get("strength"),
        "extra_generation_params": {"Schedule type": scheduler_display_name(first["scheduler"])} if first else {},
        "index_of_first_image": 0, "infotexts": [a1111_parameters(r) for r in recipes], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": first.get("clip_skip"), "is_using_inpainting_conditioning": False,
        "version": f"diffstudio {_version()}", "job_id": job.id, "outputs": job.outputs,
        "interrupted": job.state == INTERRUPTED, "ignored_fields": ignored,
    }


def _version() -> str:
    import diffstudio

    return diffstudio.__version__


@router.post("/txt2img")
async def txt2img(req: Txt2ImgRequest, request: Request):
    state = request.app.state.server
    ignored = _refuse_unsupported(req)
    return await _generate("txt2img", req, _spec(req, state, {}), state, ignored)


@router.post("/img2img")
async def img2img(req: Img2ImgRequest, request: Request):
    state = request.app.state.server
    ignored = _refuse_unsupported(req)
    fields = await asyncio.to_thread(_img2img_fields, req, state.limits.max_pixels)  # decoding: off the event loop
    return await _generate("img2img", req, _spec(req, state, fields), state, ignored)


def _img2img_fields(req: Img2ImgRequest, limit: int) -> dict[str, Any]:
    """The init image and the mask (inverted, blurred) as the pipeline's Request fields."""
    if req.resize_mode != 0:
        raise InvalidInputError(f"resize_mode={req.resize_mode} is not supported; this server resizes the init "
                                "image to the output size (resize_mode 0, 'Just resize')")
    init = decode_image(req.init_images[0], "init_images[0]", limit)
    fields: dict[str, Any] = {"init_image": init, "strength": req.denoising_strength}
    if req.mask is not None:
        if req.inpainting_fill not in (None, 1):
            raise InvalidInputError(f"inpainting_fill={req.inpainting_fill} is not supported; this server starts the "
                                    "masked area from the original image (inpainting_fill 1, 'original')")
        if req.inpaint_full_res:
            raise InvalidInputError("inpaint_full_res (inpaint 'only masked') is not supported; set it to false to "
                                    "inpaint at the whole picture's resolution")
        mask = decode_image(req.mask, "mask", limit).convert("L")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if req.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(req.mask_blur))
        fields["mask"] = mask
    return fields


# -- settings and lists ------------------------------------------------------------------------------

def check_option_values(values: dict[str, Any]) -> None:
    """The values of the options that are not names (POST /options, override_settings)."""
    clip_skip = values.get("CLIP_stop_at_last_layers")
    if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1):
        raise InvalidInputError(f"CLIP_stop_at_last_layers must be a whole number >= 1, got {clip_skip!r}")
    if not isinstance(values.get("live_previews_enable", False), bool):
        raise InvalidInputError(f"live_previews_enable must be true or false, got {values['live_previews_enable']!r}")
    every = values.get("show_progress_every_n_steps", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every == 0 or every < -1:
        raise InvalidInputError(f"show_progress_every_n_steps must be a whole number >= 1, or -1 (a preview only "
                                f"at the end of each batch), got {every!r}")


@router.get("/options")
def get_options(request: Request) -> dict:
    state = request.app.state.server
    return {k: v for k, v in state.options.items() if v is not None}


@router.post("/options")
def set_options(body: dict[str, Any], request: Request) -> dict:
    state = request.app.state.server
    unknown = sorted(set(body) - set(OPTIONS))
    if unknown:
        raise InvalidInputError(f"unknown option(s) {unknown}; this server has: {', '.join(OPTIONS)}")
    if "sd_model_checkpoint" in body:
        body["sd_model_checkpoint"] = state.catalog.checkpoint(str(body["sd_model_checkpoint"])).name
    check_option_values(body)
    state.options.update(body)  # the model loads with the next job that uses it
    return {}


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict]:
    entries = request.app.state.server.catalog.checkpoints.values()
    return [{"title": e.name, "model_name": Path(e.name).stem, "hash": None, "sha256": None, "filename": e.name,
             "config": None} for e in entries]


@router.post("/refresh-checkpoints")
def refresh_checkpoints(request: Request) -> dict:
    request.app.state.server.rescan()
    return {}


@router.post("/refresh-loras")
def refresh_loras(request: Request) -> dict:
    request.app.state.server.rescan()
    return {}


@router.get("/loras")
def loras(request: Request) -> list[dict]:
    catalog = request.app.state.server.catalog
    return [{"name": e.name, "alias": e.name, "path": e.path.relative_to(catalog.root).as_posix(), "metadata": {}}
            for e in catalog.loras.values()]


@router.get("/samplers")
def samplers() -> list[dict]:
    from diffstudio.io.recipe import sampler_display_name
    from diffstudio.sampling import SAMPLERS

    return [{"name": sampler_display_name(s), "aliases": [s], "options": {}} for s in SAMPLERS]


@router.get("/schedulers")
def schedulers() -> list[dict]:
    from diffstudio.io.recipe import scheduler_display_name
    from diffstudio.sampling import SCHEDULERS

    return [{"name": s, "label": scheduler_display_name(s), "aliases": None, "default_rho": -1,
             "need_inner_model": False} for s in ("automatic", *SCHEDULERS)]


# -- progress, interrupt, png-info --------------------------------------------------------------------

@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict:
    """The running job's progress (A1111 reports 0 when idle) and, when it makes previews, the latest one
    (``current_image``, base64 PNG; left out with ``skip_current_image``)."""
    jobs = request.app.state.server.jobs
    job = jobs.current
    running = job is not None
    eta = None
    if running and job.started and job.progress > 0:
        eta = (time.time() - job.started) * (1 - job.progress) / job.progress
    return {"progress": job.progress if running else 0.0, "eta_relative": eta or 0.0,
            "state": {"skipped": False, "interrupted": running and job.stop.is_set(), "stopping_generation": False,
                      "job": job.kind if running else "", "job_count": jobs.waiting + running,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if running else "0",
                      "job_no": 0, "sampling_step": job.step if running else 0,
                      "sampling_steps": job.steps if running else 0},
            "current_image": _current_image(job if running and not skip_current_image else None),
            "textinfo": None, "current_task": job.id if running else None}


def _current_image(job: Job | None) -> str | None:
    preview = None if job is None else job.preview
    return None if preview is None else encode_bytes(preview.png)


@router.post("/interrupt")
def interrupt(request: Request) -> dict:
    """Stop the running job at its next step; its request answers with the images finished so far."""
    request.app.state.server.jobs.interrupt()
    return {}


@router.post("/png-info")
def png_info(body: PngInfoRequest, request: Request) -> dict:
    """The text chunks of a PNG: ``info`` (A1111's parameters text), ``items`` (the others), ``parameters``
    (that text parsed into diffstudio's recipe keys)."""
    from diffstudio.io.recipe import PARAMETERS_CHUNK, parse_a1111_parameters

    chunks = png_text_chunks(body.image, request.app.state.server.limits.max_pixels)
    text = chunks.pop(PARAMETERS_CHUNK, "")
    return {"info": text, "items": chunks, "parameters": parse_a1111_parameters(text) if text else {}}
