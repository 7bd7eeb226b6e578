"""The region painter (Image tab): one canvas whose layer *i* is region *i*'s brush mask, with a prompt and a
weight per region; the layout saved as, and loaded from, the JSON of ``diffstudio generate --regions``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import gradio as gr

from diffstudio.webui import editor
from diffstudio.webui.form import RegionRow
from diffstudio.webui.layout_files import load_layout_files, save_layout_zip

REGIONS = 4
DEFAULT_CANVAS = 512
# Layer colours, one per region (the brush paints the layer's region; the colour only tells them apart).
COLORS = [(230, 60, 60), (60, 110, 230), (50, 170, 80), (230, 170, 30)]


@dataclass
class RegionPanel:
    canvas: gr.ImageEditor
    prompts: list[gr.Textbox]
    weights: list[gr.Number]
    mode: gr.Radio
    global_weight: gr.Slider

    @property
    def inputs(self) -> list:
        return [self.canvas, *self.prompts, *self.weights, self.mode, self.global_weight]


def region_rows(data: dict, panel: RegionPanel) -> list[RegionRow]:
    """The regions with a prompt, each with its layer's mask; a prompt over an empty layer is a mistake."""
    from diffstudio.errors import RegionError

    masks = editor.layer_masks(data[panel.canvas], REGIONS)
    rows = []
    for i in range(REGIONS):
        prompt = data[panel.prompts[i]] or ""
        if not prompt.strip():
            continue
        if masks[i] is None:
            raise RegionError(f"region {i + 1} has a prompt but nothing is painted on its layer ('region {i + 1}' "
                              "in the painter's layer list): paint its area or clear its prompt")
        rows.append(RegionRow(prompt, float(data[panel.weights[i]] or 0), masks[i]))
    return rows


def build_region_panel() -> RegionPanel:
    gr.Markdown("Paint each region on its own layer (pick *region N* in the layer list under the canvas), then "
                "give it a prompt. Layers without a prompt are ignored. The canvas is resized to the output.")
    canvas = gr.ImageEditor(value=editor.blank_canvas(DEFAULT_CANVAS, DEFAULT_CANVAS), type="pil", label="Regions",
                            elem_id="region-canvas", sources=(), transforms=(), height=420,
                            layers=gr.LayerOptions(allow_additional_layers=False,
                                                   layers=[f"region {i + 1}" for i in range(REGIONS)]),
                            brush=gr.Brush(default_size=48, colors=[f"#{r:02x}{g:02x}{b:02x}" for r, g, b in COLORS]))
    prompts, weights = [], []
    for i in range(REGIONS):
        with gr.Row():
            prompts.append(gr.Textbox(label=f"Region {i + 1} prompt", scale=4, elem_id=f"region-prompt-{i + 1}"))
            weights.append(gr.Number(value=1.0, minimum=0, label="weight", scale=1, elem_id=f"region-weight-{i + 1}"))
    with gr.Row():
        mode = gr.Radio(["latent", "attention"], value="latent", label="Region mode (docs/regions.md)")
        global_weight = gr.Slider(0, 1, value=0.2, step=0.05, label="Global prompt weight")
    panel = RegionPanel(canvas, prompts, weights, mode, global_weight)
    with gr.Row():
        size_w = gr.Number(value=DEFAULT_CANVAS, label="canvas width", precision=0, minimum=8)
        size_h = gr.Number(value=DEFAULT_CANVAS, label="canvas height", precision=0, minimum=8)
        clear = gr.Button("New canvas", size="sm")
    with gr.Row():
        layout_in = gr.File(label="Load a layout (.zip, or .json + its masks)", file_count="multiple",
                            file_types=[".zip", ".json", "image"], elem_id="layout-upload")
        save = gr.Button("Save layout", size="sm")
        layout_out = gr.File(label="Saved layout", interactive=False)

    clear.click(lambda w, h: editor.blank_canvas(int(w), int(h)), [size_w, size_h], canvas)
    save.click(lambda data: _save(data, panel), set(panel.inputs), layout_out)
    layout_in.upload(lambda files, data: _load(files, data, panel), [layout_in, canvas],
                     [canvas, *prompts, *weights, global_weight])
    return panel


def _save(data: dict, panel: RegionPanel):
    try:
        rows = region_rows(data, panel)
        return str(save_layout_zip(rows, data[panel.global_weight], tempfile.mkdtemp(prefix="diffstudio-layout-")))
    except Exception as err:
        raise gr.Error(str(err)) from None


def _load(files, current, panel: RegionPanel):
    from diffstudio.errors import DiffstudioError

    paths = [getattr(f, "name", f) for f in (files or [])]
    base = editor.background(current)
    canvas = base.size if base is not None else (DEFAULT_CANVAS, DEFAULT_CANVAS)
    try:
        loaded = load_layout_files(paths, canvas)
    except DiffstudioError as err:
        raise gr.Error(str(err)) from None
    if len(loaded.rows) > REGIONS:
        raise gr.Error(f"the layout has {len(loaded.rows)} regions; the painter holds {REGIONS}")
    value = editor.blank_canvas(*canvas)
    value["layers"] = [editor.mask_layer(row.mask, COLORS[i]) for i, row in enumerate(loaded.rows)]
    prompts = [row.prompt for row in loaded.rows] + [""] * (REGIONS - len(loaded.rows))
    weights = [row.weight for row in loaded.rows] + [1.0] * (REGIONS - len(loaded.rows))
    weight = loaded.global_weight if loaded.global_weight is not None else 0.2
    return [value, *prompts, *weights, weight]
