"""The Video tab: AnimateDiff text-to-video (a checkpoint + a motion module of the catalog), Stable Video Diffusion
image-to-video (with ExVideo extensions), CogVideoX (text-to-video; image-to-video with an I2V model), Diffutoon
toon shading (resumable) and FastBlend, each queued as a job of the server's queue (the same tasks the HTTP
API's /v1 video routes queue).

Every panel is its settings (left) and the same run column (right: Render, Cancel, the status line with the
job's progress - windows for Diffutoon, steps for the others -, the latest preview for SVD and CogVideoX, the
video); ``job_panel`` builds that column and wires it, so a panel only says how its values become a task."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from diffstudio.webui.animatediff_task import MAX_FRAMES, AnimateDiffTask
from diffstudio.webui.follow import follow
from diffstudio.webui.video_task import FastBlendTask


def queue_fastblend(state, task: FastBlendTask):
    """Check and queue a FastBlend task; returns the Job."""
    from diffstudio.server.jobs import Job

    task.check()
    return state.jobs.submit(Job.new("fastblend", task.params(), task))


def queue_animatediff(state, task: AnimateDiffTask):
    """Check and queue an AnimateDiff task; returns the Job."""
    from diffstudio.server.jobs import Job

    task.check(state.cache.catalog)
    return state.jobs.submit(Job.new("animatediff", task.params(), task))


def _follow_video(state, job, progress, unit: str):
    """(job id, status line, preview, video path, the id to resume from) while ``job`` runs, then its result. The
    resume id is the job's own when it stopped before finishing (a resumable task's next run continues it)."""
    from diffstudio.webui.image_tab import preview_picture

    yield job.id, "queued", None, None, ""
    line, shown = "queued", None
    for line in follow(job):
        if job.steps:
            progress((job.step, job.steps), desc=unit)
        latest = job.preview
        picture = gr.skip() if latest is None or latest is shown else preview_picture(latest)
        shown = latest or shown
        yield job.id, line, picture, None, gr.skip()
    video = str(state.outputs / job.outputs[0]) if job.outputs else None
    yield None, line, gr.skip(), video, job.id if job.state in ("interrupted", "failed") else ""


def job_panel(state, inputs: dict[str, gr.components.Component], make_job: Callable[[dict], object], label: str,
              elem_id: str, unit: str = "steps", resume: gr.Textbox | None = None, previews: bool = True) -> None:
    """The run column of a panel, wired: ``make_job(values)`` (values by the names of ``inputs``) checks and queues
    the task and returns its Job; a named error becomes the UI's error message. ``resume``: a resumable panel's
    box for the job id to continue, filled in when a job stops before it finishes. ``previews``: the task gives
    step previews (a pane for them)."""
    from diffstudio.errors import DiffstudioError
    from diffstudio.server.jobs import QueueRefusedError
    from diffstudio.webui.image_tab import cancel_job

    with gr.Column():
        with gr.Row():
            run_button = gr.Button(label, variant="primary", elem_id=elem_id)
            cancel = gr.Button("Cancel")
        status = gr.Markdown("idle")
        preview = gr.Image(label="Preview (first frame)", interactive=False, height=160) if previews else gr.State()
        output = gr.Video(label="Video", interactive=False)
    job_id = gr.State(None)
    resume_box = resume if resume is not None else gr.State("")
    components = {component: name for name, component in inputs.items()}

    def run(data, progress=gr.Progress()):
        values = {name: data[component] for component, name in components.items()}
        try:
            job = make_job(values)
        except (DiffstudioError, QueueRefusedError, ValueError) as err:
            raise gr.Error(str(err)) from None
        yield from _follow_video(state, job, progress, unit)

    run_button.click(run, set(inputs.values()), [job_id, status, preview, output, resume_box],
                     concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)


def _number(value, kind=int):
    """A Number box's value; 0 or empty = None (the model's default)."""
    return kind(value) if value else None


def build_video_tab(state) -> None:
    build_animatediff_panel(state)
    build_svd_panel(state)
    build_cogvideox_panel(state)
    build_diffutoon_panel(state)
    build_fastblend_panel(state)


def _video_models(state, family: str) -> list[str]:
    return sorted(n for n, e in state.catalog.video_models.items() if e.family == family)


def build_animatediff_panel(state) -> None:
    catalog = state.cache.catalog
    gr.Markdown("**AnimateDiff** (docs/animatediff.md): a checkpoint animated by a motion module "
                "(`MODELS/AnimateDiff`; the demo's is `shapes-motion`). Longer videos, video-to-video and "
                "resumable renders: `diffstudio video`.")
    with gr.Row():
        with gr.Column():
            i = dict(prompt=gr.Textbox(label="Prompt", value="a red circle moving to the right",
                                       elem_id="video-prompt"),
                     negative=gr.Textbox(label="Negative prompt"))
            with gr.Row():
                i["model"] = gr.Dropdown(sorted(catalog.checkpoints), value=catalog.default_checkpoint,
                                         label="Checkpoint")
                i["motion"] = gr.Dropdown(sorted(catalog.motion_modules),
                                          value=min(catalog.motion_modules, default=None), label="Motion module")
            with gr.Row():
                i["frames"] = gr.Slider(1, MAX_FRAMES, value=16, step=1, label="Frames")
                i["context"] = gr.Slider(1, 32, value=16, step=1, label="Context window (frames)")
                i["dilation"] = gr.Number(value=1, precision=0, minimum=1, label="Window dilation (frames apart)")
                i["fps"] = gr.Number(value=8, label="FPS")
            with gr.Row():
                i["steps"] = gr.Number(value=0, precision=0, label="Steps (0 = the model's)")
                i["cfg"] = gr.Number(value=0, label="CFG (0 = the model's)")
                i["seed"] = gr.Number(value=0, precision=0, label="Seed")

        def make_job(v):
            return queue_animatediff(state, AnimateDiffTask(
                v["model"], v["motion"] or "", v["prompt"], v["negative"], int(v["frames"]),
                steps=int(v["steps"] or 0), cfg_scale=float(v["cfg"] or 0), seed=int(v["seed"] or 0),
                context_length=int(v["context"]), fps=float(v["fps"] or 8),
                context_dilation=int(v["dilation"] or 1)))

        job_panel(state, i, make_job, "Render video", "animatediff", previews=False)


def build_svd_panel(state) -> None:
    from diffstudio.webui.video_jobs import queue_video_job
    from diffstudio.webui.video_model_tasks import SVDTask

    models = _video_models(state, "svd")
    gr.Markdown("**Stable Video Diffusion** (docs/svd.md): an image animated by an SVD model (`svd.safetensors`, "
                "`svd_xt.safetensors` or a diffusers folder under the models folder); ExVideo extensions make "
                "it run longer (up to their position tables, 128 frames for ExVideo-SVD-128f). 0 = SVD's default.")
    with gr.Row():
        with gr.Column():
            i = dict(image=gr.Image(label="First frame", type="pil", elem_id="svd-image"))
            with gr.Row():
                i["model"] = gr.Dropdown(models, value=models[0] if models else None, label="SVD model")
                i["extensions"] = gr.Dropdown(sorted(state.catalog.exvideo_extensions), multiselect=True,
                                              label="ExVideo extensions")
            with gr.Row():
                i["frames"] = gr.Number(value=0, precision=0, label="Frames (0 = 25)")
                i["width"] = gr.Number(value=0, precision=0, label="Width (0 = 1024)")
                i["height"] = gr.Number(value=0, precision=0, label="Height (0 = 576)")
                i["fps"] = gr.Number(value=0, precision=0, label="FPS (0 = 7)")
            with gr.Row():
                i["motion_bucket"] = gr.Number(value=127, precision=0, label="Motion bucket (more = more motion)")
                i["min_cfg"] = gr.Number(value=1.0, label="CFG at the first frame")
                i["max_cfg"] = gr.Number(value=3.0, label="CFG at the last frame")
            with gr.Row():
                i["steps"] = gr.Number(value=0, precision=0, label="Steps (0 = 25)")
                i["seed"] = gr.Number(value=0, precision=0, label="Seed")
                i["preview_every"] = gr.Number(value=5, precision=0, label="Preview every (steps, 0 = none)")

        def make_job(v):
            if not v["model"]:
                raise ValueError("no SVD model on this server: put svd.safetensors / svd_xt.safetensors (or a "
                                 "diffusers folder) under the models folder")
            return queue_video_job(state, "svd", SVDTask(
                v["model"], v["image"], list(v["extensions"] or []), frames=_number(v["frames"]),
                width=_number(v["width"]), height=_number(v["height"]), fps=_number(v["fps"], float),
                motion_bucket_id=int(v["motion_bucket"] or 0), min_cfg=float(v["min_cfg"] or 0),
                max_cfg=float(v["max_cfg"] or 0), steps=_number(v["steps"]), seed=int(v["seed"] or 0),
                preview_every=int(v["preview_every"] or 0)))

        job_panel(state, i, make_job, "Animate image", "svd")


def build_cogvideox_panel(state) -> None:
    from diffstudio.webui.video_jobs import queue_video_job
    from diffstudio.webui.video_model_tasks import CogVideoXTask

    models = _video_models(state, "cogvideox")
    gr.Markdown("**CogVideoX** (docs/cogvideox.md): text to video; with an image-to-video model (5B-I2V, 1.5-I2V) "
                "the first frame is required. Frames are 4k + 1 (49 = 6 s at 8 fps). 0 = the release's default.")
    with gr.Row():
        with gr.Column():
            i = dict(prompt=gr.Textbox(label="Prompt", elem_id="cogvideox-prompt"),
                     negative=gr.Textbox(label="Negative prompt"),
                     image=gr.Image(label="First frame (image-to-video models)", type="pil"))
            with gr.Row():
                i["model"] = gr.Dropdown(models, value=models[0] if models else None, label="CogVideoX model")
                i["sampler"] = gr.Radio(["ddim", "dpmpp_2m"], value="ddim", label="Sampler")
                i["dynamic_cfg"] = gr.Checkbox(label="Dynamic CFG")
            with gr.Row():
                i["frames"] = gr.Number(value=49, precision=0, label="Frames (4k + 1)")
                i["width"] = gr.Number(value=0, precision=0, label="Width (0 = 720)")
                i["height"] = gr.Number(value=0, precision=0, label="Height (0 = 480)")
            with gr.Row():
                i["steps"] = gr.Number(value=0, precision=0, label="Steps (0 = 50)")
                i["cfg"] = gr.Number(value=0, label="CFG (0 = 6)")
                i["seed"] = gr.Number(value=0, precision=0, label="Seed")
                i["preview_every"] = gr.Number(value=10, precision=0, label="Preview every (steps, 0 = none)")

        def make_job(v):
            if not v["model"]:
                raise ValueError("no CogVideoX model on this server: put a CogVideoX diffusers folder under the "
                                 "models folder")
            return queue_video_job(state, "cogvideox", CogVideoXTask(
                v["model"], v["prompt"], v["negative"], v["image"], frames=_number(v["frames"]),
                width=_number(v["width"]), height=_number(v["height"]), steps=_number(v["steps"]),
                cfg_scale=_number(v["cfg"], float), seed=int(v["seed"] or 0), dynamic_cfg=bool(v["dynamic_cfg"]),
                sampler=v["sampler"], preview_every=int(v["preview_every"] or 0)))

        job_panel(state, i, make_job, "Render video", "cogvideox")


def build_diffutoon_panel(state) -> None:
    from diffstudio.webui.diffutoon_task import ANNOTATORS, SMOOTHERS, DiffutoonTask
    from diffstudio.webui.video_jobs import queue_video_job

    catalog = state.catalog
    controlnets = sorted(catalog.controlnets)
    gr.Markdown("**Diffutoon** (docs/diffutoon.md): toon shading of a video with an SD 1.x checkpoint, a motion "
                "module and a lineart ControlNet (a tile ControlNet optional). Progress counts context windows; a "
                "cancelled or failed render continues from its last step when run again with its job id under "
                "*Resume job* and the same settings. With an *edit prompt* the editing branch first recolours the "
                "video at low resolution and the tile ControlNet follows that.")
    with gr.Row():
        with gr.Column():
            i = dict(video=gr.Video(label="Input video", elem_id="diffutoon-video"),
                     prompt=gr.Textbox(label="Prompt", value="best quality, perfect anime illustration"),
                     negative=gr.Textbox(label="Negative prompt"))
            with gr.Row():
                i["model"] = gr.Dropdown(sorted(catalog.checkpoints), value=catalog.default_checkpoint,
                                         label="Checkpoint")
                i["motion"] = gr.Dropdown(sorted(catalog.motion_modules),
                                          value=min(catalog.motion_modules, default=None), label="Motion module")
            with gr.Row():
                i["lineart_controlnet"] = gr.Dropdown(controlnets, value=controlnets[0] if controlnets else None,
                                                      label="Lineart ControlNet")
                i["lineart"] = gr.Dropdown(list(ANNOTATORS), value="lineart", label="Its annotator")
                i["tile_controlnet"] = gr.Dropdown(["", *controlnets], value="", label="Tile ControlNet (optional)")
            with gr.Row():
                i["steps"] = gr.Number(value=10, precision=0, label="Steps")
                i["cfg"] = gr.Number(value=7.0, label="CFG")
                i["seed"] = gr.Number(value=0, precision=0, label="Seed")
                i["smoother"] = gr.Radio(list(SMOOTHERS), value="accurate", label="FastBlend")
            with gr.Row():
                i["context"] = gr.Number(value=16, precision=0, label="Context window (frames)")
                i["stride"] = gr.Number(value=8, precision=0, label="Window stride")
                i["width"] = gr.Number(value=0, precision=0, label="Width (0 = the input's)")
                i["height"] = gr.Number(value=0, precision=0, label="Height (0 = the input's)")
            with gr.Accordion("Editing branch (optional; needs the tile ControlNet)", open=False):
                i["edit_prompt"] = gr.Textbox(label="Edit prompt (empty = no editing)", elem_id="diffutoon-edit")
                with gr.Row():
                    i["edit_softedge_controlnet"] = gr.Dropdown(["", *controlnets], value="",
                                                                label="Softedge ControlNet")
                    i["edit_softedge"] = gr.Dropdown(list(ANNOTATORS), value="softedge", label="Softedge annotator")
                with gr.Row():
                    i["edit_depth_controlnet"] = gr.Dropdown(["", *controlnets], value="", label="Depth ControlNet")
                    i["edit_depth"] = gr.Dropdown(list(ANNOTATORS), value="depth",
                                                  label="Depth annotator (depth: MiDaS, a weight file)")
                    i["edit_size"] = gr.Number(value=512, precision=0, label="Edit size (longer side)")
            resume = gr.Textbox(label="Resume job (the id of a cancelled or failed render; empty = a new one)",
                                elem_id="diffutoon-resume")
            i["resume"] = resume

        def make_job(v):
            resume_id = (v["resume"] or "").strip() or None
            if not v["video"] and resume_id is None:
                raise ValueError("upload the input video (or give the job id of a render to resume)")
            return queue_video_job(state, "diffutoon", DiffutoonTask(
                v["model"], v["motion"] or "", v["lineart_controlnet"] or "", v["prompt"], v["negative"],
                video=None if resume_id else v["video"], tile_controlnet=v["tile_controlnet"] or None,
                lineart=v["lineart"], width=int(v["width"] or 0), height=int(v["height"] or 0),
                steps=int(v["steps"] or 0), cfg_scale=float(v["cfg"] or 0), seed=int(v["seed"] or 0),
                context_length=int(v["context"] or 0), context_stride=int(v["stride"] or 0),
                smoother=v["smoother"], edit_prompt=v["edit_prompt"] or "",
                edit_softedge_controlnet=v["edit_softedge_controlnet"] or None, edit_softedge=v["edit_softedge"],
                edit_depth_controlnet=v["edit_depth_controlnet"] or None, edit_depth=v["edit_depth"],
                edit_size=int(v["edit_size"] or 512), resume=resume_id))

        job_panel(state, i, make_job, "Toon-shade video", "diffutoon", unit="windows", resume=resume,
                  previews=False)


def build_fastblend_panel(state) -> None:
    from diffstudio.video.fastblend import MODES

    gr.Markdown("**FastBlend** (docs/fastblend.md): give the original video and either its stylised version "
                "(every frame, flickering) to *blend*, or a few stylised keyframes named by their frame number "
                "(`00012.png` = frame 12) to *interpolate* the rest.")
    with gr.Row():
        with gr.Column():
            i = dict(guide=gr.Video(label="Original video", elem_id="guide-video"),
                     style=gr.Video(label="Stylised video (blend)", elem_id="style-video"),
                     keyframes=gr.File(label="Stylised keyframes (interpolate)", file_count="multiple",
                                       file_types=["image"], elem_id="keyframes"))
            with gr.Row():
                i["mode"] = gr.Radio(list(MODES), value="fast", label="Blend mode")
                i["window"] = gr.Slider(0, 60, value=15, step=1, label="Window (frames each side)")
                i["seed"] = gr.Number(value=0, precision=0, label="Seed")
            i["single"] = gr.Checkbox(label="Interpolate from the nearest keyframe only")

        def make_job(v):
            if not v["guide"]:
                raise ValueError("upload the original video")
            keys = [getattr(k, "name", k) for k in (v["keyframes"] or [])]
            return queue_fastblend(state, FastBlendTask(
                v["guide"], None if keys else v["style"], keys, v["mode"], int(v["window"]), int(v["seed"] or 0),
                bool(v["single"])))

        job_panel(state, i, make_job, "Run FastBlend", "fastblend", unit="frames", previews=False)
