"""A bounded job queue with one worker thread, and jobs persisted as one JSON file each.

A job goes ``queued -> running -> done | failed | interrupted``. At most ``size`` jobs wait behind the one
running; ``submit`` on a full queue raises :class:`QueueFullError` (the HTTP layer answers 429 with a
Retry-After estimated from the recent job durations). One worker runs the jobs in order, so one model is
in memory at a time and the jobs never compete for the device.

Every state change is written to ``FOLDER/<id>.json`` (atomically), so a restarted server still reports
the jobs that finished; a job that was queued or running when the server stopped reads as failed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from diffstudio.errors import DiffstudioError

log = logging.getLogger("diffstudio.server")

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED = "queued", "running", "done", "failed", "interrupted"
FINAL = (DONE, FAILED, INTERRUPTED)
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
PRIVATE = ("preview", "work", "done", "stop")  # Job fields neither persisted nor in public()
KEPT_IN_MEMORY = 256  # finished jobs answered from memory; older ones are read back from their files


def _jsonable(value: Any) -> Any:
    """Tensors and arrays in a recipe as lists, anything else (paths) as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class QueueRefusedError(Exception):
    """The queue takes no new job: it is full or closed."""


class QueueFullError(QueueRefusedError):
    """The queue holds ``size`` waiting jobs already; ``retry_after`` is a guess in seconds."""

    def __init__(self, size: int, retry_after: int):
        super().__init__(f"the job queue is full ({size} waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class QueueClosedError(QueueRefusedError):
    """The queue was closed (the server is shutting down): no worker would ever run the job."""

    def __init__(self):
        super().__init__("the job queue is closed: the server is shutting down")


@dataclass(frozen=True)
class Preview:
    """The latest preview of a running job's image: a PNG, and the step (1-based, over the whole job) it shows."""

    step: int
    png: bytes


class Interrupted(Exception):
    """Raised inside a running job (from its progress callback) when it was asked to stop."""


@dataclass
class Job:
    """What a client can ask about a job (persisted), plus the work and the signals (not persisted)."""

    id: str
    kind: str
    params: dict = field(default_factory=dict)  # the request, JSON-able, images left out
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0  # sampling steps done, over the whole job
    steps: int = 0  # sampling steps in the whole job (0 = not known yet)
    outputs: list[str] = field(default_factory=list)  # file names in the outputs folder
    info: dict = field(default_factory=dict)  # what the runner reports (recipes, seeds ...)
    error: str | None = None
    error_type: str | None = None
    preview: Preview | None = field(default=None, repr=False)  # in memory only (GET /v1/jobs/{id} sends it)
    work: Any = field(default=None, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def new(cls, kind: str, params: dict, work: Any) -> Job:
        return cls(uuid.uuid4().hex, kind, params, work=work)

    @property
    def progress(self) -> float:
        if self.state == DONE:
            return 1.0
        return self.step / self.steps if self.steps else 0.0

    def public(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PRIVATE}
        out["progress"] = round(self.progress, 4)
        return out

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted(f"job {self.id} was interrupted")


class JobQueue:
    """``submit(job)``; one worker thread calls ``execute(job)`` for each job in order."""

    def __init__(self, execute: Callable[[Job], None], folder: str | Path, size: int = 8):
        if size < 1:
            raise ValueError(f"the queue size must be at least 1, got {size}")
        self.execute, self.size = execute, size
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._durations: list[float] = []
        self._closed = False
        self.current: Job | None = None
        self.last: Job | None = None
        self._mark_lost_jobs()
        self._worker = threading.Thread(target=self._run, name="diffstudio-jobs", daemon=True)
        self._worker.start()

    # -- the client side -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._lock:  # only submit puts, so a queue not full here stays not full until the put
            if self._closed:
                raise QueueClosedError()
            if self._waiting.full():
                raise QueueFullError(self.size, self.retry_after())
            self._save(job)  # before the worker can see the job: its own saves come after this one
            self._remember(job)
            self._waiting.put_nowait(job)
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id, from memory or from its file (a job of an earlier run of the server)."""
        if not JOB_ID.match(job_id):
            return None
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id]
        return self._load(self.folder / f"{job_id}.json")

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def interrupt(self, job_id: str | None = None) -> Job | None:
        """Stop a job (the running one when no id is given): a queued one is skipped, a running one stops at
        its next sampling step."""
        job = self.current if job_id is None else self.get(job_id)
        if job is not None and job.state in (QUEUED, RUNNING):
            job.stop.set()
        return job

    def retry_after(self) -> int:
        recent = self._durations[-8:]
        per_job = sum(recent) / len(recent) if recent else 5.0
        return max(1, round(per_job * (self._waiting.qsize() + 1)))

    def close(self, timeout: float = 10.0) -> None:
        """Interrupt the running job and the waiting ones, then stop the worker; later submits are refused."""
        with self._lock:
            self._closed = True
        if self.current is not None:
            self.current.stop.set()
        while True:
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.stop.set()
                self._run_one(job)  # records it as interrupted
                job.done.set()
        self._waiting.put(None)
        self._worker.join(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._waiting.get()
            if job is None:
                return
            self.current = job
            try:
                self._run_one(job)
            finally:
                self.current, self.last = None, job
                job.work = None  # images and tensors of the request: free them
                job.done.set()

    def _run_one(self, job: Job) -> None:
        job.started = time.time()
        if job.stop.is_set():
            job.state, job.finished = INTERRUPTED, time.time()
            self._save(job)
            return
        job.state = RUNNING
        self._save(job)
        try:
            self.execute(job)
            job.state = DONE
        except Interrupted:
            job.state = INTERRUPTED
        except DiffstudioError as err:
            job.state, job.error, job.error_type = FAILED, str(err), type(err).__name__
        except Exception as err:  # a bug, not the client's fault: logged with its traceback, the worker goes on
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.state, job.error, job.error_type = FAILED, f"internal error: {err}", "InternalError"
        job.finished = time.time()
        if job.state == DONE:
            self._durations = [*self._durations[-31:], job.finished - job.started]
        self._save(job)

    # -- persistence ---------------------------------------------------------------------------
    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEPT_IN_MEMORY:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state not in FINAL:
                break
            self._jobs.popitem(last=False)

    def _save(self, job: Job) -> None:
        data = {k: v for k, v in job.public().items() if k != "progress"}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{job.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, default=_jsonable)
            os.replace(tmp, self.folder / f"{job.id}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path) -> Job | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            job = Job(**{k: v for k, v in data.items() if k in Job.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None
        if job.state in FINAL:
            job.done.set()
        return job

    def _mark_lost_jobs(self) -> None:
        """Jobs an earlier run of the server left queued or running can never finish: say so in their files."""
        for path in self.folder.glob("*.json"):
            job = self._load(path)
            if job is not None and job.state not in FINAL:
                job.state, job.error_type = FAILED, "ServerStopped"
                job.error = "the server stopped before this job finished; submit it again"
                job.finished = time.time()
                self._save(job)
