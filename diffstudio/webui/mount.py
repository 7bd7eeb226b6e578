"""Mounting the UI on the server's FastAPI app: Gradio at ``/ui``, ``/`` redirecting there.

The page uses the system's fonts (the default Gradio theme fetches Google Fonts, which a server without
internet access cannot), and Gradio's usage analytics are off. The server's token check and body limit wrap
the UI's routes like the API's (with ``--token`` a browser must send the header, e.g. through a proxy).
"""

from __future__ import annotations

import os

from diffstudio.webui import UI_PATH


def mount(app, state) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi.responses import RedirectResponse

    from diffstudio.webui.blocks import build_blocks

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    gr.mount_gradio_app(app, build_blocks(state), path=UI_PATH, theme=theme, footer_links=["api"],
                        allowed_paths=[str(state.outputs)])

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")
