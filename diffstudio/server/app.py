"""The server application: ``create_app(...)`` builds a FastAPI app with the A1111 routes (``/sdapi/v1``),
our own (``/v1``), the error answers, the optional token check and a body-size limit.

Everything the routes share lives in one :class:`ServerState` (``app.state.server``): the settings, the
model catalog, the loaded-model cache, the job queue and the A1111 options. A web UI joins through
``create_app(ui=...)``: a function ``ui(app, state)`` called last, which may add routes or ``app.mount`` a
static folder on the same app (the root ``/`` is then left to it); it shares the state, the token check
and the queue with the APIs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from diffstudio.errors import DiffstudioError
from diffstudio.server.catalog import Catalog, Entry
from diffstudio.server.checks import Limits
from diffstudio.server.jobs import Job, JobQueue, QueueClosedError, QueueFullError
from diffstudio.server.model_cache import ModelCache
from diffstudio.server.runner import GenerationSpec, run_job

log = logging.getLogger("diffstudio.server")

OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}(-\d{1,4}\.png|\.mp4)$")
POLL_SECONDS = 0.02  # how often a waiting A1111 request looks at its job


@dataclass
class ServerState:
    """What every route reads; ``app.state.server``."""

    catalog: Catalog
    cache: ModelCache
    jobs: JobQueue
    outputs: Path
    limits: Limits
    token: str | None = None
    options: dict = field(default_factory=dict)  # the A1111 options (sd_model_checkpoint, CLIP_stop_at_last_layers)

    def submit(self, kind: str, params: dict, spec: GenerationSpec) -> Job:
        """Queue a generation (QueueFullError when the queue is full: the app answers 429)."""
        return self.jobs.submit(Job.new(kind, params, spec))

    async def wait(self, job: Job) -> Job:
        """Wait for a job without holding a thread (the A1111 routes answer when their job has finished)."""
        while not job.done.is_set():
            await asyncio.sleep(POLL_SECONDS)
        return job

    def output_path(self, name: str) -> Path:
        """The file of an output name; only ``<job id>-<n>.png`` and ``<job id>.mp4`` names in the outputs folder."""
        from fastapi import HTTPException

        if not OUTPUT_NAME.match(name):
            raise HTTPException(400, f"{name!r} is not an output name (they look like <job id>-0.png or <job id>.mp4)")
        path = (self.outputs / name).resolve()
        if not path.is_relative_to(self.outputs) or not path.is_file():
            raise HTTPException(404, f"no output named {name}")
        return path

    def rescan(self) -> None:
        """Read the models folder again (new checkpoints and LoRAs appear; loaded models stay loaded)."""
        self.catalog = Catalog.scan(self.catalog.root)
        self.cache.use_catalog(self.catalog)


def create_app(models_dir: str | Path | None = None, outputs_dir: str | Path = "outputs", queue_size: int = 8,
               token: str | None = None, *, max_pixels: int = Limits.max_pixels, max_images: int = Limits.max_images,
               max_steps: int = Limits.max_steps, max_body_bytes: int = 64 << 20, loaded_models: int = 1,
               loader: Callable[[Entry], object] | None = None, video_loader: Callable[..., object] | None = None,
               ui: Callable[[FastAPI, ServerState], None] | None = None) -> FastAPI:
    """The app. ``models_dir``: a folder of checkpoints (None: the packaged demo model only); ``outputs_dir``:
    where images and job files go; ``queue_size``: jobs that may wait (more: 429); ``token``: required as
    ``Authorization: Bearer TOKEN`` when set; ``loaded_models``: models kept in memory (least recently used
    dropped); ``loader``: ``Entry -> Models`` (default ``diffstudio.load``); ``video_loader``: ``(Entry, extension
    Entries) -> models`` of a video model (default ``model_cache.load_video_entry``); ``ui``: see the module doc."""
    from diffstudio.server import a1111, v1, v1_video

    outputs = Path(outputs_dir).expanduser().resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.scan(models_dir)
    cache = ModelCache(catalog, loaded_models, loader, video_loader)
    limits = Limits(max_pixels, max_images, max_steps)
    jobs = JobQueue(lambda job: run_job(job, cache, outputs, limits), outputs / "jobs", queue_size)
    state = ServerState(catalog, cache, jobs, outputs, limits, token,
                        {"sd_model_checkpoint": catalog.default_checkpoint, **a1111.PREVIEW_DEFAULTS})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(jobs.close)

    app = FastAPI(title="diffstudio", version=_version(), lifespan=lifespan,
                  description="A1111-compatible routes under /sdapi/v1 and diffstudio's own under /v1 "
                              "(docs/server.md).")
    app.state.server = state
    _add_error_answers(app)
    app.include_router(a1111.router)
    app.include_router(v1.router)
    app.include_router(v1_video.router)
    if ui is not None:
        ui(app, state)
    else:
        @app.get("/", include_in_schema=False)
        def root() -> dict:
            return {"name": "diffstudio", "docs": "/docs", "openapi": "/openapi.json",
                    "apis": ["/sdapi/v1 (A1111-compatible)", "/v1"]}
    # Outermost last: the size limit runs first, then the token check, then the routes.
    if token:
        app.add_middleware(TokenCheck, token=token)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def _version() -> str:
    import diffstudio

    return diffstudio.__version__


# -- error answers ----------------------------------------------------------------------------------

def error_body(kind: str, detail: str) -> dict:
    return {"error": kind, "detail": detail}


def _add_error_answers(app: FastAPI) -> None:
    @app.exception_handler(DiffstudioError)
    async def diffstudio_error(request: Request, exc: DiffstudioError) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=422)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return JSONResponse(error_body("QueueFull", str(exc)), status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(QueueClosedError)
    async def queue_closed(request: Request, exc: QueueClosedError) -> JSONResponse:
        return JSONResponse(error_body("QueueClosed", str(exc)), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # loc is ("body", character position)
                reason = (err.get("ctx") or {}).get("error", "")
                problems.append(f"the body is not valid JSON (at character {err['loc'][-1]}: {reason}); send a "
                                "JSON object with Content-Type: application/json")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("InvalidRequest", "; ".join(problems)), status_code=422)


def job_error(job: Job) -> JSONResponse:
    """The answer of an A1111 route whose job failed: 422 for the client's mistakes, 500 for ours."""
    status = 500 if job.error_type in ("InternalError", "ServerStopped") else 422
    return JSONResponse(error_body(job.error_type or "Error", job.error or "the job failed"), status_code=status)


# -- middleware (plain ASGI: they see every request, streamed bodies included) -----------------------

class TokenCheck:
    """Every request needs ``Authorization: Bearer TOKEN`` (or HTTP Basic with the token as password, which
    A1111 clients' ``--api-auth`` settings send)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # a UI's live channel: refused the same way, before it opens
            return await send({"type": "websocket.close", "code": 1008})
        response = JSONResponse(error_body("Unauthorized", "this server needs a token: send the header "
                                                           "'Authorization: Bearer TOKEN'"),
                                status_code=401, headers={"WWW-Authenticate": 'Bearer realm="diffstudio"'})
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value.strip(), self.token)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
            return hmac.compare_digest(password, self.token)
        return False


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # A streamed body (no Content-Length): read it here, up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse(error_body("TooLarge", f"the request body is over this server's limit of "
                                                       f"{self.max_bytes} bytes"), status_code=413)
        await response(scope, receive, send)
