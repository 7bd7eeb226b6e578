"""The Video tab: FastBlend (deflicker a stylised video against its original, or render the original in the
style of keyframes), queued as a job of the server's queue."""

from __future__ import annotations

import gradio as gr

from diffstudio.webui.follow import follow
from diffstudio.webui.video_task import FastBlendTask


def queue_fastblend(state, task: FastBlendTask):
    """Check and queue a FastBlend task; returns the Job."""
    from diffstudio.server.jobs import Job

    task.check()
    return state.jobs.submit(Job.new("fastblend", task.params(), task))


def build_video_tab(state) -> None:
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
        yield job.id, "queued", None
        for line in follow(job):
            if job.steps:
                progress((job.step, job.steps), desc="frames")
            yield job.id, line, None
        yield None, line, str(state.outputs / job.outputs[0]) if job.outputs else None

    run_button.click(run, [guide, style, keyframes, mode, window, seed, single], [job_id, status, output],
                     concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)
