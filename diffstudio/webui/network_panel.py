"""The Image tab's add-on networks: LoRAs with strengths, a ControlNet unit (image, annotator preview, scale,
start/end) and an IP-Adapter image prompt (reference images, scale, start/end), all picked from the server's
catalog (``GET /v1/models`` lists the same)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from diffstudio.webui.form import PREPROCESSORS, ControlRow, ImagePromptRow

LORA_SLOTS = 3


@dataclass
class NetworkPanel:
    loras: list[gr.Dropdown]
    strengths: list[gr.Slider]
    control_model: gr.Dropdown
    control_image: gr.Image
    preprocess: gr.Radio
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    control_mode: gr.Radio
    union_mode: gr.Textbox
    ip_model: gr.Dropdown
    ip_images: gr.Gallery
    ip_scale: gr.Slider
    ip_start: gr.Slider
    ip_end: gr.Slider

    @property
    def inputs(self) -> list:
        return [*self.loras, *self.strengths, self.control_model, self.control_image, self.preprocess, self.scale,
                self.start, self.end, self.control_mode, self.union_mode, self.ip_model, self.ip_images, self.ip_scale,
                self.ip_start, self.ip_end]


def lora_values(data: dict, panel: NetworkPanel) -> list[tuple[str, float]]:
    return [(data[d], float(data[s])) for d, s in zip(panel.loras, panel.strengths) if data[d]]


def control_rows(data: dict, panel: NetworkPanel) -> list[ControlRow]:
    if not data[panel.control_model]:
        return []
    return [ControlRow(data[panel.control_model], data[panel.control_image], data[panel.preprocess],
                       float(data[panel.scale]), float(data[panel.start]), float(data[panel.end]),
                       data[panel.control_mode], data[panel.union_mode] or "")]


def image_prompt_row(data: dict, panel: NetworkPanel) -> ImagePromptRow | None:
    if not data[panel.ip_model]:
        return None
    images = [item[0] if isinstance(item, (tuple, list)) else item for item in data[panel.ip_images] or ()]
    return ImagePromptRow(data[panel.ip_model], [image.convert("RGB") for image in images],
                          float(data[panel.ip_scale]), float(data[panel.ip_start]), float(data[panel.ip_end]))


def annotate(image, preprocess: str):
    """What the ControlNet will see: the image through its annotator or as is. Annotators with weight files read
    them from the server's annotator folder (``serve --annotators``); a missing file is named in the message."""
    from diffstudio.control import annotators
    from diffstudio.errors import DiffstudioError

    if image is None:
        raise gr.Error("upload a control image first")
    if preprocess == "none":
        return image
    try:
        return getattr(annotators, preprocess)(image)
    except DiffstudioError as err:
        raise gr.Error(f"{type(err).__name__}: {err}") from None


def build_network_panel(catalog) -> NetworkPanel:
    loras = sorted(catalog.loras)
    with gr.Accordion(f"LoRA ({len(loras)} on this server)", open=False):
        if not loras:
            gr.Markdown("No LoRAs: put them in MODELS/Lora and start the server with `--models MODELS`. "
                        "`<lora:name:0.8>` tags in the prompt work too.")
        dropdowns, strengths = [], []
        for i in range(LORA_SLOTS):
            with gr.Row():
                dropdowns.append(gr.Dropdown([("none", "")] + [(n, n) for n in loras], value="", scale=3,
                                             label=f"LoRA {i + 1}", elem_id=f"lora-{i + 1}"))
                strengths.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="strength", scale=2))
    controlnets = sorted(catalog.controlnets)
    with gr.Accordion(f"ControlNet ({len(controlnets)} on this server)", open=False):
        if not controlnets:
            gr.Markdown("No ControlNets: put them in MODELS/ControlNet and start the server with `--models MODELS`.")
        model = gr.Dropdown([("none", "")] + [(n, n) for n in controlnets], value="", label="ControlNet")
        with gr.Row():
            image = gr.Image(type="pil", label="Control image", height=220)
            preview = gr.Image(type="pil", label="Annotator preview", interactive=False, height=220)
        preprocess = gr.Radio(list(PREPROCESSORS), value="none", label="Annotator (none: the image is a hint already)")
        show = gr.Button("Preview the annotator", size="sm")
        with gr.Row():
            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="scale")
            start = gr.Slider(0, 1, value=0.0, step=0.05, label="start")
            end = gr.Slider(0, 1, value=1.0, step=0.05, label="end")
        with gr.Row():
            control_mode = gr.Radio(["balanced", "prompt", "control"], value="balanced", label="Control mode")
            union_mode = gr.Textbox(label="Union mode (canny, depth, openpose ...; union ControlNets only)",
                                    elem_id="union-mode")
        show.click(annotate, [image, preprocess], preview)
    ip = build_ip_adapter_fields(catalog)
    return NetworkPanel(dropdowns, strengths, model, image, preprocess, scale, start, end, control_mode, union_mode,
                        *ip)


def build_ip_adapter_fields(catalog) -> tuple:
    adapters = sorted(catalog.ip_adapters)
    with gr.Accordion(f"IP-Adapter: image prompt ({len(adapters)} on this server)", open=False):
        gr.Markdown("Reference images prompt the model through the IP-Adapter (docs/ipadapter.md); several are "
                    "averaged. The adapter must fit the model (the Shapes IP-Adapter: the demo model).")
        model = gr.Dropdown([("none", "")] + [(n, n) for n in adapters], value="", label="IP-Adapter",
                            elem_id="ip-adapter")
        images = gr.Gallery(type="pil", label="Reference images", interactive=True, columns=4, height=200,
                            elem_id="ip-images")
        with gr.Row():
            scale = gr.Slider(0, 1.5, value=0.7, step=0.05, label="scale (0 = off)", elem_id="ip-scale")
            start = gr.Slider(0, 1, value=0.0, step=0.05, label="start")
            end = gr.Slider(0, 1, value=1.0, step=0.05, label="end")
    return model, images, scale, start, end
