"""What the video tasks of the queue share: queueing a task, the job's step counter and previews, and the work
folder a resumable render keeps per job id.

A video task has ``check(state)`` (named errors before anything is queued or loaded), ``params()`` (what the
job file records: no images) and ``run(job, cache, outputs)`` (the worker's call). Its output is
``OUTPUTS/<job id>.mp4``; a resumable one keeps its intermediates in ``OUTPUTS/work/<job id>/``, and a new job
given ``resume=<that id>`` continues in that folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from diffstudio.errors import InvalidInputError

WORK_FOLDER = "work"  # under the outputs folder: one folder per resumable job


def queue_video_job(state, kind: str, task):
    """Check ``task`` against the server (catalog, limits, jobs) and queue it; returns the Job."""
    from diffstudio.server.jobs import Job

    task.check(state)
    return state.jobs.submit(Job.new(kind, task.params(), task))


def work_folder(outputs: Path, job_id: str) -> Path:
    return Path(outputs) / WORK_FOLDER / job_id


def check_resume(state, kind: str, job_id: str) -> str:
    """The id of the work folder an earlier ``kind`` job that stopped before it finished (interrupted or failed)
    left: its own, or, for a job that was itself a resumption, the folder it continued."""
    from diffstudio.server.jobs import DONE

    job = state.jobs.get(str(job_id).strip())
    if job is None or job.kind != kind:
        raise InvalidInputError(f"resume: no {kind} job {job_id!r} on this server")
    if job.state == DONE:
        raise InvalidInputError(f"resume: job {job.id} finished; its video is /v1/outputs/{job.id}.mp4")
    if job.state not in ("interrupted", "failed"):
        raise InvalidInputError(f"resume: job {job.id} is {job.state}; cancel it first (DELETE /v1/jobs/{job.id})")
    folder_id = job.params.get("work_id") or job.id
    if not work_folder(state.outputs, folder_id).is_dir():
        raise InvalidInputError(f"resume: job {job.id} left no work folder to continue from")
    return folder_id


def check_size(limits, width: int, height: int, multiple: int, steps: int) -> None:
    """Sides (0 = the model's default) positive multiples of ``multiple`` within the pixel limit; steps (0 = the
    default) within the step limit."""
    from diffstudio.errors import InvalidSizeError
    from diffstudio.server.checks import check_counts

    if width < 0 or height < 0 or width % multiple or height % multiple:
        raise InvalidSizeError(f"width and height must be multiples of {multiple} (0 = the model's), got "
                               f"{width}x{height}")
    check_counts(limits, width or None, height or None, steps or None, 1, 1)


def step_callback(job, preview_every: int = 0, preview: Callable | None = None):
    """A sampler callback ``(i, total, x, x0)``: the job's step counter, a preview of ``preview(x0)`` (a PIL image)
    every ``preview_every`` steps and at the last, and Cancel honoured at every step."""
    from diffstudio.server.jobs import Preview

    def on_step(i, total, x, x0):
        job.steps, job.step = total, i + 1
        if preview is not None and preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
            buffer = io.BytesIO()
            preview(x0).save(buffer, format="PNG")
            job.preview = Preview(job.step, buffer.getvalue())
        job.check_stop()

    return on_step
