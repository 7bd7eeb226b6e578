"""``diffstudio serve``: an HTTP API over the engine (docs/server.md).

* ``/sdapi/v1``: the AUTOMATIC1111 / Forge web API, so their clients work unchanged (``a1111.py``);
* ``/v1``: diffstudio's own, with the full request as a queued job (``v1.py``);
* one job queue with one worker thread (``jobs.py``), one loaded model kept (``model_cache.py``), the models
  folder scanned into names (``catalog.py``).

``create_app(...)`` (``app.py``) builds the FastAPI app; it needs the ``server`` extra
(``pip install "diffstudio[server]"``: fastapi, uvicorn).
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """``diffstudio.server.app.create_app`` (imported on first use: fastapi is an optional extra)."""
    from diffstudio.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
