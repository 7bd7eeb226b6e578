"""The Video tab: AnimateDiff text-to-video (a checkpoint + a motion module of the catalog) and FastBlend
(deflicker a stylised video against its original, or render the original in the style of keyframes), each queued
as a job of the server's queue."""

from __future__ import annotations

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
    """(job id, status line, video path) while ``job`` runs, then its result."""
    yield job.id, "queued", None
    line = "queued"
    for line in follow(job):
        if job.steps:
            progress((job.step, job.steps), desc=unit)
        yield job.id, line, None
    yield None, line, str(state.outputs / job.outputs[0]) if job.outputs else None


def build_video_tab(state) -> None:
    build_animatediff_panel(state)
    build_fastblend_panel(state)


def build_animatediff_panel(state) -> None:
    from diffstudio.errors import DiffstudioError
    from diffstudio.server.jobs import QueueRefusedError
    from diffstudio.webui.image_tab import cancel_job

    catalog = state.cache.catalog
    gr.Markdown("**AnimateDiff** (docs/animatediff.md): a checkpoint animated by a motion module "
                "(`MODELS/AnimateDiff`; the demo's is `shapes-motion`). Longer videos, video-to-video and "
                "resumable renders: `diffstudio video`.")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a red circle moving to the right", elem_id="video-prompt")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                model = gr.Dropdown(sorted(catalog.checkpoints), value=catalog.default_checkpoint, label="Checkpoint")
                motion = gr.Dropdown(sorted(catalog.motion_modules), value=min(catalog.motion_modules, default=None),
                                     label="Motion module")
            with gr.Row():
                frames = gr.Slider(1, MAX_FRAMES, value=16, step=1, label="Frames")
                context = gr.Slider(1, 32, value=16, step=1, label="Context window (frames)")
                fps = gr.Number(value=8, label="FPS")
            with gr.Row():
                steps = gr.Number(value=0, precision=0, label="Steps (0 = the model's)")
                cfg = gr.Number(value=0, label="CFG (0 = the model's)")
                seed = gr.Number(value=0, precision=0, label="Seed")
        with gr.Column():
            with gr.Row():
                run_button = gr.Button("Render video", variant="primary", elem_id="animatediff")
                cancel = gr.Button("Cancel")
            status = gr.Markdown("idle")
            output = gr.Video(label="Video", interactive=False)
    job_id = gr.State(None)

    def run(model_name, motion_name, prompt_text, negative_text, frame_count, context_length, fps_value, steps_value,
            cfg_value, seed_value, progress=gr.Progress()):
        task = AnimateDiffTask(model_name, motion_name or "", prompt_text, negative_text, int(frame_count),
                               steps=int(steps_value or 0), cfg_scale=float(cfg_value or 0), seed=int(seed_value or 0),
                               context_length=int(context_length), fps=float(fps_value or 8))
        try:
            job = queue_animatediff(state, task)
        except (DiffstudioError, QueueRefusedError) as err:
            raise gr.Error(str(err)) from None
        yield from _follow_video(state, job, progress, "steps")

    run_button.click(run, [model, motion, prompt, negative, frames, context, fps, steps, cfg, seed],
                     [job_id, status, output], concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)


def build_fastblend_panel(state) -> None:
    from diffstudio.errors import DiffstudioError
    from diffstudio.server.jobs import QueueRefusedError
    from diffstudio.video.fastblend import MODES
    from diffstudio.webui.image_tab import cancel_job

    gr.Markdown("**FastBlend** (docs/fastblend.md): give the original video and either its stylised version "
                "(every frame, flickering) to *blend*, or a few stylised keyframes named by their frame number "
                "(`00012.png` = frame 12) to *interpolate* the rest.")
    with gr.Row():
        with gr.Column():
            guide = gr.Video(label="Original video", elem_id="guide-video")
            style = gr.Video(label="Stylised video (blend)", elem_id="style-video")
            keyframes = gr.File(label="Stylised keyframes (interpolate)", file_count="multiple",
                                file_types=["image"], elem_id="keyframes")
            with gr.Row():
                mode = gr.Radio(list(MODES), value="fast", label="Blend mode")
                window = gr.Slider(0, 60, value=15, step=1, label="Window (frames each side)")
                seed = gr.Number(value=0, precision=0, label="Seed")
            single = gr.Checkbox(label="Interpolate from the nearest keyframe only")
        with gr.Column():
            with gr.Row():
                run_button = gr.Button("Run FastBlend", variant="primary", elem_id="fastblend")
                cancel = gr.Button("Cancel")
            status = gr.Markdown("idle")
            output = gr.Video(label="Result", interactive=False)
    job_id = gr.State(None)

    def run(guide_path, style_path, key_files, mode_value, window_value, seed_value, single_value,
            progress=gr.Progress()):
        if not guide_path:
            raise gr.Error("upload the original video")
        keys = [getattr(k, "name", k) for k in (key_files or [])]
        task = FastBlendTask(guide_path, None if keys else style_path, keys, mode_value, int(window_value),
                             int(seed_value or 0), bool(single_value))
        try:
            job = queue_fastblend(state, task)
        except (DiffstudioError, QueueRefusedError) as err:
            raise gr.Error(str(err)) from None
        yield from _follow_video(state, job, progress, "frames")

    run_button.click(run, [guide, style, keyframes, mode, window, seed, single], [job_id, status, output],
                     concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)
