"""The Image tab: model, prompts, sampling settings, img2img / inpainting, regions, LoRAs, ControlNet, IP-Adapter;
Generate queues the same ``/v1`` request the HTTP API takes, then shows progress, step previews and the images
with their recipes."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from diffstudio.webui import editor
from diffstudio.webui.follow import follow
from diffstudio.webui.form import MODES, ImageForm, queue_form
from diffstudio.webui.network_panel import build_network_panel, control_rows, image_prompt_row, lora_values
from diffstudio.webui.recipes import form_values, gallery_items, read_file_recipe
from diffstudio.webui.region_panel import build_region_panel, region_rows

PROMPT_HELP = ("Prompt language (A1111's, docs/prompts.md): `(word:1.3)` stronger, `[word]` weaker, `BREAK` starts "
               "a new 75-token chunk, `<lora:name:0.8>` applies a LoRA.")
PREVIEW_EVERY = 5  # the Image tab's default preview interval, in steps
PREVIEW_PANE = 192  # previews smaller than this (longer side) are enlarged for the pane


@dataclass
class Fields:
    model: gr.Dropdown
    prompt: gr.Textbox
    negative: gr.Textbox
    sampler: gr.Dropdown
    scheduler: gr.Dropdown
    steps: gr.Slider
    cfg: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    batch_size: gr.Slider
    batches: gr.Slider
    mode: gr.Radio
    init: gr.ImageEditor
    strength: gr.Slider
    preview_every: gr.Slider

    @property
    def recipe_fields(self) -> list:
        """The fields ``recipes.RECIPE_FIELDS`` fill, in its order."""
        return [self.prompt, self.negative, self.steps, self.cfg, self.seed, self.width, self.height, self.sampler,
                self.scheduler]


def model_choices(catalog) -> list[tuple[str, str]]:
    return [(f"{e.name}  ({e.family or 'family read on load'})", e.name) for e in catalog.checkpoints.values()]


def _sampler_choices() -> tuple[list, list]:
    from diffstudio.io.recipe import sampler_display_name, scheduler_display_name
    from diffstudio.sampling import SAMPLERS, SCHEDULERS

    samplers = [("Automatic (the model's)", "")] + [(sampler_display_name(s), s) for s in SAMPLERS]
    schedulers = [("Automatic (the model's)", "")] + [(scheduler_display_name(s), s) for s in SCHEDULERS]
    return samplers, schedulers


def build_fields(state) -> Fields:
    samplers, schedulers = _sampler_choices()
    model = gr.Dropdown(model_choices(state.catalog), value=state.options["sd_model_checkpoint"],
                        label="Model (family)", elem_id="model")
    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="a red circle, white background")
    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
    gr.Markdown(PROMPT_HELP)
    with gr.Row():
        sampler = gr.Dropdown(samplers, value="", label="Sampler")
        scheduler = gr.Dropdown(schedulers, value="", label="Schedule")
    with gr.Row():
        steps = gr.Slider(0, state.limits.max_steps, value=0, step=1, label="Steps (0 = the model's)",
                          elem_id="steps")
        cfg = gr.Slider(0, 20, value=0, step=0.5, label="CFG scale (0 = the model's)")
    with gr.Row():
        width = gr.Slider(0, 2048, value=0, step=8, label="Width (0 = the model's)", elem_id="width")
        height = gr.Slider(0, 2048, value=0, step=8, label="Height (0 = the model's)", elem_id="height")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=-1, label="Seed (-1 = random)", elem_id="seed")
        batch_size = gr.Slider(1, state.limits.max_images, value=1, step=1, label="Batch size")
        batches = gr.Slider(1, state.limits.max_images, value=1, step=1, label="Batches")
    preview_every = gr.Slider(0, 20, value=PREVIEW_EVERY, step=1, elem_id="preview-every",
                              label="Preview every N steps (0 = none; each preview is one VAE decode)")
    with gr.Accordion("img2img / inpainting", open=False):
        mode = gr.Radio(list(MODES), value="txt2img", label="Mode", elem_id="mode")
        init = gr.ImageEditor(type="pil", label="Image (inpaint: paint the area to repaint)", height=380,
                              layers=False, transforms=(), elem_id="init-image",
                              brush=gr.Brush(default_size=24, colors=["#ffffff"], color_mode="fixed"))
        strength = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Denoising strength")
    return Fields(model, prompt, negative, sampler, scheduler, steps, cfg, width, height, seed, batch_size, batches,
                  mode, init, strength, preview_every)


def read_form(data: dict, f: Fields, regions, networks) -> ImageForm:
    """The Image tab's values (a Gradio ``{component: value}`` dict) -> an ImageForm."""
    init = data[f.init]
    return ImageForm(
        prompt=data[f.prompt] or "", negative_prompt=data[f.negative] or "", model=data[f.model],
        sampler=data[f.sampler] or "", scheduler=data[f.scheduler] or "", steps=int(data[f.steps]),
        cfg_scale=float(data[f.cfg]), width=int(data[f.width]), height=int(data[f.height]),
        seed=int(data[f.seed] if data[f.seed] is not None else 0), batch_size=int(data[f.batch_size]),
        batches=int(data[f.batches]), mode=data[f.mode], init_image=editor.background(init),
        mask=editor.painted_mask(init), strength=float(data[f.strength]), regions=region_rows(data, regions),
        region_mode=data[regions.mode], global_weight=float(data[regions.global_weight]),
        loras=lora_values(data, networks), controlnets=control_rows(data, networks),
        ip_adapter=image_prompt_row(data, networks),
        preview_every=int(data[f.preview_every]))


def preview_picture(preview, least_side: int = PREVIEW_PANE):
    """A job's latest Preview (PNG bytes) as a PIL image for the preview pane; a small one enlarged by a whole
    factor (nearest neighbour, so its pixels stay sharp) to at least ``least_side`` pixels on its longer side."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(preview.png)) as image:
        picture = image.convert("RGB")
    factor = max(1, least_side // max(picture.size))
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST) if factor > 1 else picture


def cancel_job(state, job_id: str | None) -> None:
    """The Cancel buttons: the API's interrupt of that job (a queued job never runs, a running one stops)."""
    if job_id:
        state.jobs.interrupt(job_id)


def build_image_tab(state) -> None:
    from diffstudio.errors import DiffstudioError
    from diffstudio.server.jobs import QueueRefusedError

    with gr.Row():
        with gr.Column(scale=3):
            f = build_fields(state)
            with gr.Accordion("Regions (a prompt per painted area)", open=False):
                regions = build_region_panel()
            networks = build_network_panel(state.catalog)
        with gr.Column(scale=2):
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", elem_id="cancel")
            status = gr.Markdown("idle", elem_id="status")
            preview = gr.Image(type="pil", label="Preview (the current estimate)", interactive=False, height=280,
                               elem_id="preview", format="png")
            gallery = gr.Gallery(label="Outputs", columns=2, format="png", elem_id="gallery", height=360)
            recipe = gr.JSON(label="Recipe of the selected image", elem_id="recipe")
            send = gr.Button("Send to img2img", elem_id="send-to-img2img")
            with gr.Accordion("PNG info: drop an image to read its recipe", open=False):
                dropped = gr.File(label="Image (PNG, JPEG, WebP)", file_types=["image"], elem_id="png-info")
                dropped_recipe = gr.JSON(label="Its recipe")
                use = gr.Button("Use this recipe", size="sm")
    job_id = gr.State(None)
    results = gr.State([])  # [(path, recipe)] of the last job
    selected = gr.State(None)

    inputs = {f.model, f.prompt, f.negative, f.sampler, f.scheduler, f.steps, f.cfg, f.width, f.height, f.seed,
              f.batch_size, f.batches, f.mode, f.init, f.strength, f.preview_every, *regions.inputs, *networks.inputs}

    def run(data, progress=gr.Progress()):
        try:
            job = queue_form(state, read_form(data, f, regions, networks))
        except (DiffstudioError, QueueRefusedError, ValueError) as err:  # ValueError: the form's and pydantic's
            raise gr.Error(str(err)) from None
        yield {job_id: job.id, status: "queued", preview: None}
        shown = None
        for line in follow(job):
            if job.steps:
                progress((job.step, job.steps), desc="sampling")
            latest = job.preview
            if latest is not None and latest is not shown:
                shown = latest
                yield {status: line, preview: preview_picture(latest)}
            else:
                yield {status: line}
        recipes = job.info.get("recipes") or []
        items = gallery_items(state.outputs, job.outputs, recipes)
        yield {status: line, gallery: items, results: [(p, r) for (p, _), r in zip(items, recipes)],
               recipe: recipes[0] if recipes else None, selected: 0 if recipes else None, job_id: None}

    generate.click(run, inputs, [job_id, status, preview, gallery, results, recipe, selected], concurrency_limit=None)
    cancel.click(lambda jid: cancel_job(state, jid), job_id, None)

    def select(items, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        return index, items[index][1] if index < len(items) else None

    gallery.select(select, results, [selected, recipe])

    def send_to_img2img(items, index):
        if index is None or index >= len(items):
            raise gr.Error("select an image in the gallery first")
        from PIL import Image

        with Image.open(items[index][0]) as image:
            picture = image.convert("RGB")
        return {"background": picture, "layers": [], "composite": None}, "img2img"

    send.click(send_to_img2img, [results, selected], [f.init, f.mode])

    def read_dropped(file):
        try:
            return read_file_recipe(getattr(file, "name", file))
        except DiffstudioError as err:
            raise gr.Error(str(err)) from None

    dropped.upload(read_dropped, dropped, dropped_recipe)
    use.click(lambda r: form_values(r or {}), dropped_recipe, f.recipe_fields)
