"""Step previews: a job that asks for them keeps the latest decoded x0 estimate, `/v1/jobs/{id}` sends it and
`/sdapi/v1/progress` sends it as `current_image` (base64 PNG); a job that does not ask has none. The demo model
at 64x64 on a live server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import diffstudio  # noqa: E402
from diffstudio.server.app import create_app  # noqa: E402
from tests.server_fixtures import LiveServer, pixels  # noqa: E402

FAST = {"width": 64, "height": 64, "seed": 4, "sampler": "euler", "prompt": "a red circle, white background"}


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    live = LiveServer(create_app(None, tmp_path_factory.mktemp("previews"), loader=lambda entry: models))
    yield live
    live.stop()


def png(data: str) -> Image.Image:
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def test_a_job_with_previews_keeps_the_last_estimate(server):
    job_id = server.client.post("/v1/generate", json={**FAST, "steps": 4, "preview_every": 2}).json()["id"]
    job = server.wait_job(job_id)
    assert job["state"] == "done" and job["preview_step"] == 4
    preview = png(job["preview"])
    assert preview.size == (64, 64) and preview.mode == "RGB"
    # Euler's last step lands on its x0 estimate: the last preview is the output image (up to rounding).
    output = pixels(server.client.get(job["urls"][0]).content).astype(int)
    assert np.abs(np.asarray(preview).astype(int) - output).max() <= 1
    assert server.client.get(f"/v1/jobs/{job_id}", params={"preview": "false"}).json()["preview"] is None


def test_a_job_without_previews_has_none(server):
    job = server.wait_job(server.client.post("/v1/generate", json={**FAST, "steps": 2}).json()["id"])
    assert job["state"] == "done" and job["preview"] is None and job["preview_step"] is None


def test_progress_sends_the_running_a1111_jobs_preview(server):
    c = server.client
    assert c.post("/sdapi/v1/options", json={"live_previews_enable": "yes"}).status_code == 422
    assert c.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 0}).status_code == 422
    assert c.post("/sdapi/v1/options", json={"live_previews_enable": True,
                                             "show_progress_every_n_steps": 1}).status_code == 200
    try:
        answer = {}
        worker = threading.Thread(target=lambda: answer.update(r=c.post("/sdapi/v1/txt2img", json={**FAST,
                                                                                                   "steps": 150})))
        worker.start()
        deadline, state = time.time() + 60, {}
        while time.time() < deadline:
            state = c.get("/sdapi/v1/progress").json()
            if state["current_image"]:
                break
            time.sleep(0.02)
        image = png(state["current_image"])
        assert image.size == (64, 64)
        assert c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
        c.post("/sdapi/v1/interrupt")
        worker.join(60)
        assert answer["r"].status_code == 200
    finally:
        c.post("/sdapi/v1/options", json={"live_previews_enable": False})


def test_a_preview_is_at_most_max_side_pixels(models):
    from diffstudio.pipeline.preview import preview_image

    z = diffstudio.Pipeline(models).sample(diffstudio.Request("a blue square", width=64, height=32, steps=1),
                                           progress=False)[1]
    assert preview_image(diffstudio.Pipeline(models), z, max_side=32).size == (32, 16)
