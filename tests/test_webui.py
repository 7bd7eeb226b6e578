"""The web UI's request building: the Image tab's values become the /v1 request the HTTP API takes, and the job
the UI queues gives the Python API's image for the same recipe (the demo model, 64x64, 2 steps). Region
layouts round-trip through the painter's files; editor layers become masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("gradio")

import diffstudio  # noqa: E402
from diffstudio.server.app import create_app  # noqa: E402
from diffstudio.webui import editor  # noqa: E402
from diffstudio.webui.form import ControlRow, ImageForm, ImagePromptRow, RegionRow, queue_form, to_payload  # noqa: E402
from diffstudio.webui.image_tab import preview_picture  # noqa: E402
from diffstudio.webui.layout_files import load_layout_files, save_layout_zip  # noqa: E402
from tests.server_fixtures import half_mask, picture  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


@pytest.fixture(scope="module")
def app(tmp_path_factory, models):
    app = create_app(None, tmp_path_factory.mktemp("webui-out"), loader=lambda entry: models)
    yield app
    app.state.server.jobs.close()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_form_values_become_the_v1_request():
    form = ImageForm("a red circle", "blurry", model="shapes-sd", sampler="euler_ancestral", steps=2, width=64,
                     height=64, seed=5, mode="inpaint", init_image=picture(1), mask=half_mask(), strength=0.6,
                     regions=[RegionRow("a blue square", 0.5, half_mask()), RegionRow("  ")], global_weight=0.3,
                     loras=[("flat", 0.8), ("", 1.0)],
                     controlnets=[ControlRow("union", picture(1), mode=" depth "), ControlRow("edges", picture(2))])
    payload = to_payload(form)
    assert [c["mode"] for c in payload["controlnets"]] == ["depth", None]  # a union unit's mode; none for the other
    assert payload["steps"] == 2 and payload["cfg_scale"] is None and payload["scheduler"] is None  # 0 / "" = default
    assert payload["strength"] == 0.6 and payload["init_image"] and payload["mask"]
    assert [r["prompt"] for r in payload["regions"]] == ["a blue square"]  # a region without a prompt is left out
    assert payload["regions"][0]["weight"] == 0.5 and payload["global_weight"] == 0.3
    assert payload["loras"] == [{"name": "flat", "strength": 0.8}]
    assert "ip_adapter" not in payload
    form.ip_adapter = ImagePromptRow("shapes-ip-adapter", [picture(3)], scale=0.9, end=0.5)
    payload = to_payload(form)
    assert {k: v for k, v in payload["ip_adapter"].items() if k != "images"} == {
        "name": "shapes-ip-adapter", "scale": 0.9, "start": 0.0, "end": 0.5}
    assert len(payload["ip_adapter"]["images"]) == 1
    from diffstudio.server.v1 import GenerateRequest

    GenerateRequest(**payload)  # the API's own model accepts it


def test_img2img_without_an_image_is_refused_with_a_message():
    with pytest.raises(ValueError, match="needs an image"):
        to_payload(ImageForm("x", mode="img2img"))
    with pytest.raises(ValueError, match="needs reference images"):
        to_payload(ImageForm("x", ip_adapter=ImagePromptRow("shapes-ip-adapter")))


def test_the_annotator_preview_offers_every_annotator_and_names_a_missing_weight_file(monkeypatch, tmp_path):
    import gradio as gr

    from diffstudio.control import annotators
    from diffstudio.webui.form import PREPROCESSORS
    from diffstudio.webui.network_panel import annotate

    assert {"none", "canny", "hed", "lineart_realistic", "depth", "openpose"} <= set(PREPROCESSORS)
    image = picture(2)
    assert np.array_equal(np.asarray(annotate(image, "canny")), np.asarray(annotators.canny(image)))
    monkeypatch.setenv("DIFFSTUDIO_ANNOTATORS", str(tmp_path))
    with pytest.raises(gr.Error, match="AnnotatorWeightsNotFoundError.*ControlNetHED.pth"):
        annotate(image, "hed")


def test_the_ip_adapter_panel_reads_gallery_items():
    from types import SimpleNamespace

    from diffstudio.webui.network_panel import image_prompt_row

    panel = SimpleNamespace(ip_model="m", ip_images="g", ip_scale="s", ip_start="a", ip_end="b")
    data = {"m": "shapes-ip-adapter", "g": [(picture(1), None), picture(2).convert("RGBA")], "s": 0.5, "a": 0.1,
            "b": 0.9}
    row = image_prompt_row(data, panel)
    assert row.name == "shapes-ip-adapter" and [i.mode for i in row.images] == ["RGB", "RGB"]
    assert (row.scale, row.start, row.end) == (0.5, 0.1, 0.9)
    assert image_prompt_row({**data, "m": ""}, panel) is None


def test_a_ui_job_gives_the_python_api_image(app, models):
    state = app.state.server
    form = ImageForm("a red circle", steps=2, width=64, height=64, seed=7, sampler="euler",
                     regions=[RegionRow("a blue square", 1.0, half_mask())], preview_every=1)
    job = queue_form(state, form)
    assert job.done.wait(120) and job.state == "done", job.error
    assert job.preview.step == 2 and preview_picture(job.preview).size == (192, 192)  # the pane's, enlarged 3x
    ours = _pixels(state.outputs / job.outputs[0])
    expected = diffstudio.Pipeline(models)("a red circle", steps=2, width=64, height=64, seed=7, sampler="euler",
                                           regions=[diffstudio.Region("a blue square", mask=half_mask())],
                                           progress=False)[0]
    np.testing.assert_array_equal(ours, np.asarray(expected.convert("RGB")))


def test_a_ui_job_equals_the_same_request_sent_to_the_api(app):
    from fastapi.testclient import TestClient

    state = app.state.server
    form = ImageForm("a green triangle", steps=2, width=64, height=64, seed=3, mode="img2img",
                     init_image=picture(2), strength=0.5)
    job = queue_form(state, form)
    client = TestClient(app)  # not as a context manager: its exit runs the app's shutdown, which closes the queue
    answer = client.post("/v1/generate", json=to_payload(form))
    assert answer.status_code == 202
    api_job = state.jobs.get(answer.json()["id"])
    assert api_job.done.wait(120) and job.done.wait(120)
    np.testing.assert_array_equal(_pixels(state.outputs / job.outputs[0]),
                                  _pixels(state.outputs / api_job.outputs[0]))


def test_a_saved_layout_loads_back_and_reads_as_a_diffstudio_layout(tmp_path):
    import zipfile

    from diffstudio.pipeline.region_layout import load_layout

    rows = [RegionRow("left", 0.7, half_mask().transpose(Image.FLIP_LEFT_RIGHT)), RegionRow("right", 1.0, half_mask())]
    path = save_layout_zip(rows, 0.25, tmp_path)
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "unzipped")
    layout = load_layout(tmp_path / "unzipped" / "layout.json")  # what `diffstudio generate --regions` reads
    assert [r.prompt for r in layout.regions] == ["left", "right"] and layout.global_weight == 0.25
    loaded = load_layout_files([path], (64, 64))
    assert [(r.prompt, r.weight) for r in loaded.rows] == [("left", 0.7), ("right", 1.0)]
    np.testing.assert_array_equal(np.asarray(loaded.rows[1].mask), np.asarray(half_mask()))


def test_a_box_layout_json_is_drawn_as_masks(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"regions": [{"prompt": "top", "box": [0, 0, 1, 0.5]}]}))
    mask = np.asarray(load_layout_files([path], (32, 16)).rows[0].mask)
    assert mask.shape == (16, 32) and mask[:8].min() == 255 and mask[8:].max() == 0


def test_editor_layers_become_masks():
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 4, 8))
    value = {"background": Image.new("RGB", (8, 8), "white"), "layers": [layer, Image.new("RGBA", (8, 8))]}
    masks = editor.layer_masks(value, 3)
    assert masks[1] is None and masks[2] is None
    assert np.asarray(masks[0])[:, :4].min() == 255 and np.asarray(masks[0])[:, 4:].max() == 0
    np.testing.assert_array_equal(np.asarray(editor.painted_mask(value)), np.asarray(masks[0]))
    assert editor.background(value).mode == "RGB"


def test_fastblend_runs_as_a_job_of_the_queue(app, tmp_path):
    from diffstudio.video import video_io
    from diffstudio.video.fastblend import interpolate
    from diffstudio.webui.video_tab import queue_fastblend
    from diffstudio.webui.video_task import FastBlendTask

    guide = tmp_path / "guide"
    guide.mkdir()
    frames = [np.asarray(picture(i, 32)) for i in range(4)]
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(guide / f"{i:05d}.png")
    key = tmp_path / "00000.png"
    Image.fromarray(255 - frames[0]).save(key)
    job = queue_fastblend(app.state.server, FastBlendTask(str(guide), keyframes=[str(key)]))
    assert job.done.wait(120) and job.state == "done", job.error
    assert job.step == job.steps == 4
    written = video_io.read_frames(str(app.state.server.outputs / job.outputs[0]))
    expected = interpolate({0: 255 - frames[0]}, frames)
    assert len(written) == 4 and np.abs(written[0].astype(int) - expected[0]).mean() < 8  # H.264, visually lossless


def test_animatediff_runs_as_a_job_and_leaves_the_cached_model_an_image_model(app, models):
    from diffstudio.errors import InvalidInputError
    from diffstudio.video import video_io
    from diffstudio.video.render import VideoPipeline
    from diffstudio.webui.animatediff_task import AnimateDiffTask
    from diffstudio.webui.video_tab import queue_animatediff

    state = app.state.server
    task = AnimateDiffTask("shapes-sd", "shapes-motion", "a red circle moving to the right", frames=6, steps=3, seed=2,
                           context_length=6, context_dilation=2)
    job = queue_animatediff(state, task)
    assert job.done.wait(300) and job.state == "done", job.error
    assert (job.step, job.steps) == (3, 3)
    written = video_io.read_frames(str(state.outputs / job.outputs[0]))
    expected = models.clone()
    expected.add_motion_module(state.catalog.motion_module("shapes-motion").path)
    frames = VideoPipeline(expected)("a red circle moving to the right", num_frames=6, steps=3, seed=2,
                                     context_length=6, context_dilation=2, progress=False)
    assert len(written) == 6
    for got, want in zip(written, frames):  # H.264, visually lossless
        assert np.abs(got.astype(int) - np.asarray(want.convert("RGB"))).mean() < 8
    assert "motion" not in models.components  # image jobs on the cached model stay frame-wise
    with pytest.raises(InvalidInputError, match="no motion module named"):
        queue_animatediff(state, AnimateDiffTask("shapes-sd", "nope", "x"))

    from fastapi.testclient import TestClient

    client = TestClient(app)  # not as a context manager: its exit would close the shared queue
    body = {"prompt": "a red circle moving to the right", "motion": "shapes-motion", "frames": 6, "steps": 3, "seed": 2,
            "context_length": 6, "context_dilation": 2}
    answer = client.post("/v1/animatediff", json=body)
    assert answer.status_code == 202, answer.text
    api_job = state.jobs.get(answer.json()["id"])
    assert api_job.done.wait(300) and api_job.state == "done", api_job.error
    video = client.get(f"/v1/outputs/{api_job.outputs[0]}")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    np.testing.assert_array_equal(np.stack(video_io.read_frames(str(state.outputs / api_job.outputs[0]))),
                                  np.stack(written))  # the API's job is the UI's
    refused = client.post("/v1/animatediff", json={"prompt": "x", "motion": "nope"})
    assert refused.status_code == 422 and "no motion module named" in refused.text


def test_lora_training_runs_as_a_job_with_its_loss_history_and_samples(app, models, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from diffstudio.webui.training_tab import queue_training
    from diffstudio.webui.training_task import LoRATrainingTask

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        picture(i).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red circle")
    done = []
    task = LoRATrainingTask("shapes-sd", str(data), str(tmp_path / "x.safetensors"), steps=4, checkpoint_every=2,
                            finished=done.append, sample_prompt="a red circle, white background", sample_steps=3)
    job = queue_training(app.state.server, task)
    assert job.done.wait(300) and job.state == "done", job.error
    assert job.step == 4 and len(job.info["losses"]) == 4 and all(np.isfinite(job.info["losses"]))
    assert done == [tmp_path / "x.safetensors"] and done[0].is_file()
    # A sample at each checkpoint, the last one with the finished LoRA: the Python API's image for it.
    assert [s["step"] for s in job.info["samples"]] == [2, 4] and len(job.outputs) == 2
    from diffstudio.webui.training_tab import sample_items

    assert [caption for _, caption in sample_items(app.state.server, job)] == ["step 2", "step 4"]
    samples = [_pixels(app.state.server.outputs / name) for name in job.outputs]
    assert all(s.shape == (64, 64, 3) for s in samples) and not np.array_equal(samples[0], samples[1])
    clone = models.clone()
    clone.apply_lora(done[0])
    expected = diffstudio.Pipeline(clone)("a red circle, white background", width=64, height=64, seed=0, steps=3,
                                          progress=False)[0]
    models.activate()
    np.testing.assert_array_equal(samples[1], np.asarray(expected.convert("RGB")))
