"""Waiting on a queued job from a UI event: the job's progress while it runs, at a fixed poll interval.

The job objects are the queue's own (``diffstudio.server.jobs.Job``), so what the UI shows is what
``/v1/jobs/{id}`` and ``/sdapi/v1/progress`` report, and the UI's Cancel is the API's interrupt.
"""

from __future__ import annotations

from collections.abc import Iterator

from diffstudio.server.jobs import DONE, FAILED, INTERRUPTED, QUEUED

POLL_SECONDS = 0.1


def follow(job, poll: float = POLL_SECONDS) -> Iterator[str]:
    """Yields a progress line each poll until the job has finished (then one last line)."""
    while not job.done.wait(poll):
        yield progress_line(job)
    yield progress_line(job)


def progress_line(job) -> str:
    """'queued', 'step 3/20 (15%)', 'done: 2 images', 'failed: ...' — the job's state in words."""
    if job.state == QUEUED:
        return f"queued (job {job.id[:8]})"
    if job.state == DONE:
        return f"done: {len(job.outputs)} output(s) in {(job.finished or 0) - (job.started or 0):.1f} s"
    if job.state == INTERRUPTED:
        return f"cancelled after {len(job.outputs)} output(s)"
    if job.state == FAILED:
        return f"failed: {job.error_type}: {job.error}"
    if job.steps:
        return f"running: step {job.step}/{job.steps} ({job.progress:.0%})"
    return "running: loading the model ..."
