"""The Training tab: a LoRA trained on uploaded images and captions, as a job of the server's queue, with its
progress, loss curve and a sample image at each checkpoint (the sample prompt with the LoRA as it stands then).
The images are copied to ``OUTPUTS/training/<name>/data``; the LoRA is written to ``MODELS/Lora/<name>.safetensors``
(then the models folder is rescanned, so it can be picked at once) or, on a server without ``--models``, to
``OUTPUTS/loras/<name>.safetensors``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gradio as gr

from diffstudio.webui.follow import follow
from diffstudio.webui.training_task import LoRATrainingTask

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def lora_destination(state, name: str) -> Path:
    root = state.catalog.root
    folder = root / "Lora" if root is not None else state.outputs / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.safetensors"


def stage_uploads(state, name: str, files: list[str]) -> Path:
    """Copy uploaded images and caption files (flat, by base name) into this run's data folder."""
    folder = state.outputs / "training" / name / "data"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, folder / Path(path).name)
    return folder


def queue_training(state, task: LoRATrainingTask):
    from diffstudio.server.jobs import Job

    task.check()
    return state.jobs.submit(Job.new("train_lora", task.params(), task))


def build_training_tab(state) -> None:
    from diffstudio.errors import DiffstudioError, InvalidInputError
    from diffstudio.server.jobs import QueueRefusedError
    from diffstudio.webui.image_tab import cancel_job, model_choices

    gr.Markdown("**LoRA training** (docs/training.md): upload images with their captions (a `.txt` of the same "
                "name beside each image, or one `metadata.csv` with `file_name,text`).")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Images and captions", file_count="multiple", elem_id="training-files")
            name = gr.Textbox(value="my-lora", label="LoRA name")
            model = gr.Dropdown(model_choices(state.catalog), value=state.options["sd_model_checkpoint"],
                                label="Base model")
            with gr.Row():
                steps = gr.Number(value=100, precision=0, minimum=1, label="Steps")
                rank = gr.Number(value=4, precision=0, minimum=1, label="Rank")
                lr = gr.Number(value=1e-4, minimum=0, label="Learning rate")
            with gr.Row():
                resolution = gr.Number(value=0, precision=0, minimum=0, label="Resolution (0 = the model's)")
                every = gr.Number(value=10, precision=0, minimum=1, label="Checkpoint (and report) every")
                seed = gr.Number(value=0, precision=0, label="Seed")
            sample_prompt = gr.Textbox(label="Sample prompt (an image with the LoRA at each checkpoint; empty = none)",
                                       elem_id="training-sample-prompt")
            restart = gr.Checkbox(label="Start over (discard this name's earlier checkpoint)")
        with gr.Column():
            with gr.Row():
                train = gr.Button("Train", variant="primary", elem_id="train")
                cancel = gr.Button("Cancel")
            status = gr.Markdown("idle")
            loss = gr.LinePlot(x="step", y="loss", title="Training loss", height=260)
            readout = gr.Markdown("")
            samples = gr.Gallery(label="Samples at the checkpoints", columns=4, height=240, format="png",
                                 elem_id="training-samples")
    job_id = gr.State(None)

    def run(uploads, name_value, model_value, steps_value, rank_value, lr_value, res_value, every_value, seed_value,
            restart_value, sample_value, progress=gr.Progress()):
        try:
            if not NAME.match(name_value or ""):
                raise InvalidInputError("name the LoRA with letters, digits, '-', '_' or '.' (up to 64)")
            if not uploads:
                raise InvalidInputError("upload the training images and their captions")
            data = stage_uploads(state, name_value, [getattr(u, "name", u) for u in uploads])
            task = LoRATrainingTask(model_value, str(data), str(lora_destination(state, name_value)),
                                    steps=int(steps_value), rank=int(rank_value), lr=float(lr_value),
                                    resolution=int(res_value) or None, checkpoint_every=int(every_value),
                                    seed=int(seed_value or 0), restart=bool(restart_value),
                                    sample_prompt=(sample_value or "").strip(), finished=lambda _: state.rescan())
            job = queue_training(state, task)
        except (DiffstudioError, QueueRefusedError) as err:
            raise gr.Error(str(err)) from None
        yield job.id, "queued", None, "", []
        for line in follow(job, poll=0.5):
            if job.steps:
                progress((job.step, job.steps), desc="training")
            yield job.id, line, loss_frame(job), loss_readout(job), sample_items(state, job)
        yield None, line, loss_frame(job), loss_readout(job), sample_items(state, job)

    train.click(run, [files, name, model, steps, rank, lr, resolution, every, seed, restart, sample_prompt],
                [job_id, status, loss, readout, samples], concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)


def sample_items(state, job) -> list[tuple[str, str]]:
    """The job's checkpoint samples as gallery items: (file, "step N")."""
    return [(str(state.outputs / s["output"]), f"step {s['step']}") for s in job.info.get("samples") or []]


def loss_frame(job):
    import pandas as pd

    losses = job.info.get("losses") or []
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses})


def loss_readout(job) -> str:
    losses = job.info.get("losses") or []
    if not losses:
        return ""
    recent = losses[-10:]
    mean = sum(recent) / len(recent)
    text = f"step {len(losses)}: loss {losses[-1]:.4f} (mean of the last {len(recent)}: {mean:.4f})"
    if job.info.get("lora"):
        text += f"; saved **{job.info['lora']}**"
    return text
