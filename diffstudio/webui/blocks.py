"""The web UI as one Gradio Blocks app: the Image, Video and Training tabs over one server state."""

from __future__ import annotations

import gradio as gr

TITLE = "diffstudio"


def build_blocks(state) -> gr.Blocks:
    from diffstudio.webui.image_tab import build_image_tab
    from diffstudio.webui.training_tab import build_training_tab
    from diffstudio.webui.video_tab import build_video_tab

    with gr.Blocks(title=TITLE) as blocks:
        gr.Markdown(f"## {TITLE}  ·  API: [/docs](/docs) · [/sdapi/v1](/docs#/A1111-compatible) · "
                    "jobs share one queue with the HTTP API")
        with gr.Tabs():
            with gr.Tab("Image", id="image", elem_id="tab-image"):
                build_image_tab(state)
            with gr.Tab("Video", id="video", elem_id="tab-video"):
                build_video_tab(state)
            with gr.Tab("Training", id="training", elem_id="tab-training"):
                build_training_tab(state)
    return blocks
