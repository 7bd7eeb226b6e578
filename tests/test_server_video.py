"""The video jobs of the HTTP API: ``/v1/svd``, ``/v1/cogvideox`` and ``/v1/diffutoon`` against the Python API.

A models folder holds a tiny random SVD single file (release layout) with an ExVideo extension for its UNet, a
tiny random CogVideoX diffusers folder (5B-style transformer, T5, 3D VAE) and the Shapes demo's ControlNet; the
catalog lists them by content. Each job's MP4 decodes to exactly the frames of the MP4 the Python API writes for
the same recipe (same frames in, same encoder: equal pixels), bad requests are named 4xx errors, and a cancelled
Diffutoon job resumed from its work folder gives the uninterrupted render's video.
"""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

import diffstudio  # noqa: E402
from diffstudio.loader import default_model_path  # noqa: E402
from diffstudio.server.app import create_app  # noqa: E402
from diffstudio.video import video_io  # noqa: E402
from tests.server_fixtures import b64_png  # noqa: E402

WEIGHTS = default_model_path().parent
CONTROLNET = WEIGHTS / "shapes-controlnet.safetensors"
SVD_RUN = dict(frames=3, width=32, height=32, steps=2, seed=3, min_cfg=1.0, max_cfg=2.5)
COG_RUN = dict(frames=9, width=64, height=48, steps=2, cfg_scale=6.0, seed=4)
TOON_RUN = dict(steps=2, cfg_scale=7.0, context_length=4, context_stride=2, smoother="none", lineart="canny",
                seed=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The models folder: svd/tiny_svd.safetensors, ExVideo/tiny_exvideo.safetensors, cogvideox/ (diffusers),
    ControlNet/shapes-controlnet.safetensors."""
    from safetensors.torch import save_file

    from diffstudio.video.svd_loading import load_svd
    from tests.test_exvideo import _synthetic_file
    from tests.tiny_cogvideo import reference_models, write_diffusers_folder
    from tests.tiny_svd import write_svd_file

    root = tmp_path_factory.mktemp("video-models")
    (root / "svd").mkdir()
    svd = write_svd_file(root / "svd" / "tiny_svd.safetensors")
    extension, _ = _synthetic_file(load_svd(svd).unet.config)
    (root / "ExVideo").mkdir()
    save_file({k: v * 0.01 for k, v in extension.items()}, str(root / "ExVideo" / "tiny_exvideo.safetensors"))
    dit, t5, vae = reference_models("5b")
    cog = write_diffusers_folder(root / "cogvideox", dit, t5, "5b")
    vae.save_pretrained(cog / "vae")
    index = json.loads((cog / "model_index.json").read_text())
    (cog / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    (root / "ControlNet").mkdir()
    shutil.copyfile(CONTROLNET, root / "ControlNet" / CONTROLNET.name)
    return root


@pytest.fixture(scope="module")
def app(folder, tmp_path_factory):
    app = create_app(folder, tmp_path_factory.mktemp("video-out"), loaded_models=2)
    yield app
    app.state.server.jobs.close()


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)  # not as a context manager: its exit would close the shared queue


def _run(client, route: str, body: dict, timeout: float = 300) -> dict:
    answer = client.post(route, json=body)
    assert answer.status_code == 202, answer.text
    job = client.app.state.server.jobs.get(answer.json()["id"])
    assert job.done.wait(timeout) and job.state == "done", (job.state, job.error)
    return client.get(f"/v1/jobs/{job.id}").json()


def _frames(client, job: dict) -> np.ndarray:
    video = client.get(job["urls"][0])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    return np.stack(video_io.read_frames(str(client.app.state.server.outputs / job["outputs"][0])))


def _first_frame(seed: int = 0, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_the_catalog_lists_video_models_and_extensions_apart_from_checkpoints(client):
    listing = client.get("/v1/models").json()
    assert {(m["name"], m["family"]) for m in listing["video_models"]} == {
        ("svd/tiny_svd.safetensors", "svd"), ("cogvideox", "cogvideox")}
    assert listing["exvideo_extensions"] == ["tiny_exvideo"]
    assert "shapes-controlnet" in listing["controlnets"]
    assert not {"svd/tiny_svd.safetensors", "cogvideox"} & {c["name"] for c in listing["checkpoints"]}


def test_svd_job_equals_the_python_api_with_an_exvideo_extension(client, folder, tmp_path):
    from diffstudio.video.svd import SVDPipeline
    from diffstudio.video.svd_loading import load_svd

    image = _first_frame(1)
    body = {"model": "tiny_svd", "image": b64_png(image), "extensions": ["tiny_exvideo"], "preview_every": 1,
            **SVD_RUN}
    job = _run(client, "/v1/svd", body)
    assert job["step"] == job["steps"] == 2 and job["preview"] and job["preview_step"] == 2
    models = load_svd(folder / "svd" / "tiny_svd.safetensors", folder / "ExVideo" / "tiny_exvideo.safetensors")
    expected = SVDPipeline(models)(image, num_frames=3, width=32, height=32, steps=2, seed=3, min_cfg=1.0,
                                   max_cfg=2.5, output=str(tmp_path / "svd.mp4"))
    np.testing.assert_array_equal(_frames(client, job), np.stack(video_io.read_frames(expected)))
    plain = _run(client, "/v1/svd", {**body, "extensions": []})  # held apart in the cache: another video
    assert not np.array_equal(_frames(client, plain), _frames(client, job))
    assert set(client.app.state.server.cache.loaded) == {"svd/tiny_svd.safetensors+tiny_exvideo",
                                                         "svd/tiny_svd.safetensors"}


def test_cogvideox_job_equals_the_python_api(client, folder, tmp_path):
    from diffstudio.video.cogvideo import CogVideoPipeline

    job = _run(client, "/v1/cogvideox", {"model": "cogvideox", "prompt": "a red fox", "negative_prompt": "blurry",
                                          "preview_every": 2, **COG_RUN})
    assert job["step"] == job["steps"] == 2 and job["preview"]
    expected = CogVideoPipeline(diffstudio.load(folder / "cogvideox"))(
        "a red fox", "blurry", num_frames=9, width=64, height=48, steps=2, cfg_scale=6.0, seed=4,
        output=str(tmp_path / "cog.mp4"))
    np.testing.assert_array_equal(_frames(client, job), np.stack(video_io.read_frames(expected)))
    # A text-to-video model given a first frame fails in the job with the pipeline's named error.
    answer = client.post("/v1/cogvideox", json={"model": "cogvideox", "prompt": "x", "image": b64_png(
        _first_frame(0, (64, 48))), **COG_RUN})
    failed = client.app.state.server.jobs.get(answer.json()["id"])
    assert failed.done.wait(300) and failed.state == "failed" and "image-to-video" in failed.error


@pytest.mark.parametrize(("route", "body", "message"), [
    ("/v1/svd", {"model": "nope", "image": "AAAA"}, "no SVD model named 'nope'"),
    ("/v1/svd", {"model": "cogvideox", "image": "AAAA"}, "no SVD model named 'cogvideox'"),
    ("/v1/svd", {"model": "tiny_svd", "image": "not base64!"}, "not valid base64"),
    ("/v1/svd", {"model": "tiny_svd", "image": "IMAGE", "extensions": ["x"]}, "no ExVideo extension named"),
    ("/v1/svd", {"model": "tiny_svd", "image": "IMAGE", "width": 30}, "multiples of 8"),
    ("/v1/svd", {"model": "tiny_svd", "image": "IMAGE", "sampler": "nope"}, "unknown sampler"),
    ("/v1/svd", {"model": "tiny_svd", "image": "IMAGE", "frames": 0}, "frames must be"),
    ("/v1/cogvideox", {"model": "cogvideox", "prompt": "x", "frames": 10}, "4k + 1"),
    ("/v1/cogvideox", {"model": "cogvideox", "prompt": " "}, "needs a prompt"),
    ("/v1/cogvideox", {"model": "cogvideox", "prompt": "x", "width": 40}, "multiples of 16"),
    ("/v1/cogvideox", {"model": "cogvideox", "prompt": "x", "guidance": 3}, "guidance"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet"},
     "needs an input video"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "nope", "video": "AAAA"},
     "no ControlNet named"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
                       "video": "AAAA"}, "cannot be read"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
                       "resume": "0" * 32}, "no diffutoon job"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
                       "edit_prompt": "y"}, "tile ControlNet"),
    ("/v1/diffutoon", {"prompt": "x", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
                       "tile_controlnet": "shapes-controlnet", "edit_prompt": "y",
                       "edit_depth_controlnet": "shapes-controlnet"}, "dpt_hybrid-midas-501f0c75.pt"),
])
def test_bad_requests_are_named_4xx_errors(client, route, body, message, monkeypatch):
    monkeypatch.delenv("DIFFSTUDIO_ANNOTATORS", raising=False)
    if body.get("image") == "IMAGE":
        body = {**body, "image": b64_png(_first_frame())}
    before = client.app.state.server.jobs.waiting
    answer = client.post(route, json=body)
    assert answer.status_code == 422 and message in answer.text, answer.text
    assert client.app.state.server.jobs.waiting == before


def _input_frames() -> list[np.ndarray]:
    """6 frames, 64x64, of a red disc moving right."""
    from PIL import ImageDraw

    frames = []
    for i in range(6):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((10 + 3 * i, 22, 30 + 3 * i, 42), fill="red")
        frames.append(np.asarray(image))
    return frames


def test_diffutoon_takes_a_video_file(client, tmp_path):
    """An MP4 upload is opened and checked at queue time (the job itself is cancelled: the render is the same as
    from frames, below)."""
    video_io.write_frames(str(tmp_path / "in.mp4"), _input_frames(), 8.0)
    body = {"prompt": "a red circle", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
            "video": base64.b64encode((tmp_path / "in.mp4").read_bytes()).decode(), **TOON_RUN}
    state = client.app.state.server
    answer = client.post("/v1/diffutoon", json=body)
    assert answer.status_code == 202, answer.text
    job = state.jobs.interrupt(answer.json()["id"])
    assert job.done.wait(300) and job.state == "interrupted"
    both = client.post("/v1/diffutoon", json={**body, "frames": [b64_png(Image.new("RGB", (8, 8)))]})
    assert both.status_code == 422 and "not both" in both.text


def test_diffutoon_job_equals_the_python_api_and_resumes_after_a_cancel(client, tmp_path, monkeypatch):
    from diffstudio.video.diffutoon import toon_shade
    from diffstudio.webui import diffutoon_task

    state = client.app.state.server
    frames = _input_frames()
    body = {"prompt": "a red circle", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
            "frames": [b64_png(Image.fromarray(f)) for f in frames], **TOON_RUN}
    models = diffstudio.load()
    models.add_motion_module(WEIGHTS / "shapes-motion.safetensors")
    expected = toon_shade(models, frames, "a red circle", lineart_controlnet=str(CONTROLNET),
                          output=str(tmp_path / "toon.mp4"), progress=False,
                          **{k: None if v == "none" else v for k, v in TOON_RUN.items()})
    expected = np.stack(video_io.read_frames(expected))

    # Stop the first job after the first window of its second step (the first step's state is on disk).
    windows = 2  # 6 frames in windows of 4 every 2
    original = diffutoon_task.WindowProgress.__call__

    def stop_once(self, *args):
        original(self, *args)
        if self.job.step == windows + 1 and not stopped:
            stopped.append(self.job.id)
            self.job.stop.set()

    stopped: list[str] = []
    monkeypatch.setattr(diffutoon_task.WindowProgress, "__call__", stop_once)
    first = state.jobs.get(client.post("/v1/diffutoon", json=body).json()["id"])
    assert first.done.wait(300) and first.state == "interrupted" and first.steps == 2 * windows
    assert len(list((state.outputs / "work" / first.id / "source").glob("*.png"))) == 6 and not first.outputs
    answer = client.post("/v1/diffutoon", json={**body, "frames": None, "resume": first.id})
    assert answer.status_code == 202, answer.text
    resumed = state.jobs.get(answer.json()["id"])
    assert resumed.done.wait(300) and resumed.state == "done", resumed.error
    assert resumed.step == resumed.steps == 2 * windows and resumed.info["resumed_from"] == first.id
    job = client.get(f"/v1/jobs/{resumed.id}").json()
    np.testing.assert_array_equal(_frames(client, job), expected)
    done = client.post("/v1/diffutoon", json={**body, "frames": None, "resume": resumed.id})
    assert done.status_code == 422 and "finished" in done.text


def test_a_diffutoon_job_with_the_editing_branch_equals_the_python_api(client, tmp_path):
    from diffstudio.video.diffutoon import toon_shade

    frames = _input_frames()
    edit = {"edit_prompt": "a blue circle", "edit_softedge_controlnet": "shapes-controlnet", "edit_size": 64}
    body = {"prompt": "a red circle", "motion": "shapes-motion", "lineart_controlnet": "shapes-controlnet",
            "tile_controlnet": "shapes-controlnet", "frames": [b64_png(Image.fromarray(f)) for f in frames],
            **TOON_RUN, **edit}
    job = _run(client, "/v1/diffutoon", body)
    models = diffstudio.load()
    models.add_motion_module(WEIGHTS / "shapes-motion.safetensors")
    expected = toon_shade(models, frames, "a red circle", lineart_controlnet=str(CONTROLNET),
                          tile_controlnet=str(CONTROLNET), edit_prompt="a blue circle",
                          edit_softedge_controlnet=str(CONTROLNET), edit_size=64, output=str(tmp_path / "toon.mp4"),
                          progress=False, **{k: None if v == "none" else v for k, v in TOON_RUN.items()})
    np.testing.assert_array_equal(_frames(client, job), np.stack(video_io.read_frames(expected)))
    stage_one = client.app.state.server.outputs / "work" / job["id"] / "render" / "stage1"
    assert len(list(stage_one.glob("*.png"))) == len(frames)  # the editing branch ran


def test_the_video_tab_panels_queue_the_api_tasks(client, folder):
    """The SVD panel of the Video tab, driven with its form's values, queues the task /v1/svd queues: equal video.
    The CogVideoX and Diffutoon panels list the catalog's models and refuse a form without its input."""
    pytest.importorskip("gradio")
    import gradio as gr

    from diffstudio.webui.blocks import build_blocks

    state = client.app.state.server
    blocks = build_blocks(state)

    def panel(elem_id):
        (fn,) = [f for f in blocks.fns.values()
                 if any(getattr(blocks.blocks.get(t[0]), "elem_id", None) == elem_id for t in f.targets)]
        return fn, {c.label: c for c in fn.inputs}

    fn, by_label = panel("svd")
    assert by_label["SVD model"].choices == [("svd/tiny_svd.safetensors", "svd/tiny_svd.safetensors")]
    image = _first_frame(2)
    values = {"First frame": image, "ExVideo extensions": ["tiny_exvideo"], "Frames (0 = 25)": 3,
              "Width (0 = 1024)": 32, "Height (0 = 576)": 32, "Steps (0 = 25)": 2, "Seed": 3,
              "CFG at the first frame": 1.0, "CFG at the last frame": 2.5, "Preview every (steps, 0 = none)": 1}
    data = {c: values.get(label, c.value) for label, c in by_label.items()}
    *_, (job_id, line, _, video, resume) = list(fn.fn(data))
    assert line.startswith("done") and video and resume == ""
    api = _run(client, "/v1/svd", {"model": "tiny_svd", "image": b64_png(image), "extensions": ["tiny_exvideo"],
                                   **SVD_RUN})
    np.testing.assert_array_equal(np.stack(video_io.read_frames(video)), _frames(client, api))

    fn, by_label = panel("cogvideox")
    assert by_label["CogVideoX model"].value == "cogvideox"
    with pytest.raises(gr.Error, match="4k \\+ 1"):
        list(fn.fn({c: {"Prompt": "x", "Frames (4k + 1)": 10}.get(label, c.value) for label, c in by_label.items()}))
    fn, by_label = panel("diffutoon")
    with pytest.raises(gr.Error, match="upload the input video"):
        list(fn.fn({c: c.value for c in by_label.values()}))
