"""The web UI of ``diffstudio serve`` (docs/webui.md): a Gradio app mounted on the server's FastAPI app at ``/ui``.

Every job the UI starts goes through the server's one job queue (``diffstudio.server.jobs``): images as the
same ``/v1`` request the HTTP API takes (``form.py`` builds it, ``diffstudio.server.v1.queue_generation``
queues it), FastBlend and LoRA training as tasks the queue's worker runs (``video_task.py``,
``training_task.py``). Progress, cancel and the queue's limit are therefore the API's.

Files, one job each: ``form.py`` (UI values -> the request), ``editor.py`` (image-editor values -> images and
masks), ``layout_files.py`` (region layouts to and from files), ``recipes.py`` (gallery captions, reading a
PNG's recipe back), ``follow.py`` (waiting on a job with progress), ``*_tab.py`` (the Gradio tabs),
``blocks.py`` (the app), ``mount.py`` (mounting it). The UI needs the ``webui`` extra (gradio); the server
runs without it.
"""

from __future__ import annotations

UI_PATH = "/ui"


def gradio_available() -> bool:
    """Whether the UI can be built (gradio importable)."""
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


def mount_ui(app, state) -> None:
    """``create_app(ui=mount_ui)``: the UI at ``/ui`` on ``app`` (``/`` redirects there)."""
    from diffstudio.webui.mount import mount

    mount(app, state)
