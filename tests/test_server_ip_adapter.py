"""IP-Adapters on the server: the models-folder catalog places them by content (among ControlNets too, as A1111
keeps them) and by their folder, the demo catalog offers the Shapes IP-Adapter, and a `/v1` request with it gives
the Python API's image for the same ImagePrompt; an unknown name is a 422 with the names there are. The demo model
at 64x64, 4 steps."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import diffstudio  # noqa: E402
from diffstudio.demo.ip_adapter_build import WEIGHTS, reference  # noqa: E402
from diffstudio.server.app import create_app  # noqa: E402
from diffstudio.server.catalog import Catalog  # noqa: E402
from tests.server_fixtures import b64_png, controlnet_state_dict, pixels  # noqa: E402

RUN = {"prompt": "a circle in the center, white background", "seed": 5, "steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, models):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ip-models")
    for folder in ("ControlNet", "ipadapter/image_encoder", "misc"):
        (root / folder).mkdir(parents=True)
    save_file(controlnet_state_dict(models), str(root / "ControlNet" / "edges.safetensors"))
    shutil.copyfile(WEIGHTS, root / "ControlNet" / "colour-a1111.safetensors")  # A1111 keeps them here
    shutil.copyfile(WEIGHTS, root / "misc" / "colour-found.safetensors")  # found by its header
    from diffstudio.io.state_dict import read_state_dict

    adapter = {k: v for k, v in read_state_dict(WEIGHTS).items() if not k.startswith("image_encoder.")}
    torch.save({"image_proj": {k.split(".", 1)[1]: v for k, v in adapter.items() if k.startswith("image_proj.")},
                "ip_adapter": {k.split(".", 1)[1]: v for k, v in adapter.items() if k.startswith("ip_adapter.")}},
               root / "ipadapter" / "colour-release.bin")  # h94's layout: a .bin with its encoder in a folder
    torch.save({"x": torch.zeros(1)}, root / "ipadapter" / "image_encoder" / "pytorch_model.bin")
    return root


@pytest.fixture(scope="module")
def app(tmp_path_factory, models, models_dir):
    app = create_app(models_dir, tmp_path_factory.mktemp("ip-out"), loader=lambda entry: models)
    yield app
    app.state.server.jobs.close()


def test_the_catalog_places_ip_adapters(models_dir):
    catalog = Catalog.scan(models_dir)
    assert sorted(catalog.ip_adapters) == ["colour-a1111", "colour-found", "colour-release", "shapes-ip-adapter"]
    assert sorted(catalog.controlnets) == ["edges"]
    assert catalog.ip_adapters["shapes-ip-adapter"].path == WEIGHTS.resolve()
    assert sorted(Catalog.scan(None).ip_adapters) == ["shapes-ip-adapter"]  # the demo catalog


def _run(client, body: dict) -> dict:
    answer = client.post("/v1/generate", json=body)
    assert answer.status_code == 202, answer.text
    job_id, deadline = answer.json()["id"], time.time() + 120
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_a_v1_image_prompt_gives_the_python_api_image(app, models):
    from fastapi.testclient import TestClient

    client = TestClient(app)  # not as a context manager: its exit runs the app's shutdown, which closes the queue
    assert "shapes-ip-adapter" in client.get("/v1/models").json()["ip_adapters"]
    ref = reference("blue", "square")
    job = _run(client, {**RUN, "ip_adapter": {"name": "shapes-ip-adapter", "images": [b64_png(ref)], "scale": 0.9,
                                              "start": 0.0, "end": 0.75}})
    assert job["state"] == "done", job["error"]
    assert job["info"]["recipes"][0]["extra"]["ip_adapter"][0]["scale"] == 0.9
    ours = pixels(client.get(job["urls"][0]).content)
    prompt = diffstudio.ImagePrompt(ref, scale=0.9, end=0.75, model=models.add_ip_adapter(WEIGHTS))
    expected = diffstudio.Pipeline(models)(RUN["prompt"], seed=5, steps=4, width=64, height=64, ip_adapter=prompt,
                                           progress=False)[0]
    np.testing.assert_array_equal(ours, np.asarray(expected.convert("RGB")))
    plain = diffstudio.Pipeline(models)(RUN["prompt"], seed=5, steps=4, width=64, height=64, progress=False)[0]
    assert np.abs(ours.astype(int) - np.asarray(plain.convert("RGB")).astype(int)).mean() > 1  # it did something


@pytest.mark.parametrize("ip_adapter, detail", [
    ({"name": "nope", "images": ["x"]}, "no IP-Adapter named 'nope'"),
    ({"name": "shapes-ip-adapter", "images": []}, "ip_adapter.images"),
    ({"name": "shapes-ip-adapter", "images": ["not base64!"]}, "base64"),
    ({"name": "shapes-ip-adapter", "images": [None]}, "ip_adapter.images"),
])
def test_bad_image_prompts_are_refused_before_queueing(app, ip_adapter, detail):
    from fastapi.testclient import TestClient

    answer = TestClient(app).post("/v1/generate", json={**RUN, "ip_adapter": ip_adapter})
    assert answer.status_code == 422 and detail in answer.json()["detail"], answer.text


def test_start_after_end_is_refused(app):
    from fastapi.testclient import TestClient

    body = {**RUN, "ip_adapter": {"name": "shapes-ip-adapter", "images": [b64_png(reference())], "start": 0.8,
                                  "end": 0.2}}
    answer = TestClient(app).post("/v1/generate", json=body)
    assert answer.status_code == 422 and answer.json()["error"] == "InvalidInputError", answer.text


def test_several_image_prompts_in_one_request_give_the_python_api_image(app, models):
    """``ip_adapter`` plus ``ip_adapters``: one ImagePrompt each, in that order, as the Python API's list."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    square, circle = reference("blue", "square"), reference("red", "circle")
    body = {**RUN, "ip_adapter": {"name": "shapes-ip-adapter", "images": [b64_png(square)], "scale": 0.6},
            "ip_adapters": [{"name": "shapes-ip-adapter", "images": [b64_png(circle)], "scale": 0.5, "end": 0.75}]}
    job = _run(client, body)
    assert job["state"] == "done", job["error"]
    assert [p["scale"] for p in job["info"]["recipes"][0]["extra"]["ip_adapter"]] == [0.6, 0.5]
    adapter = models.add_ip_adapter(WEIGHTS)
    prompts = [diffstudio.ImagePrompt(square, scale=0.6, model=adapter),
               diffstudio.ImagePrompt(circle, scale=0.5, end=0.75, model=adapter)]
    expected = diffstudio.Pipeline(models)(RUN["prompt"], seed=5, steps=4, width=64, height=64, ip_adapter=prompts,
                                           progress=False)[0]
    ours = pixels(client.get(job["urls"][0]).content)
    np.testing.assert_array_equal(ours, np.asarray(expected.convert("RGB")))
    one = pixels(client.get(_run(client, {**RUN, "ip_adapter": body["ip_adapter"]})["urls"][0]).content)
    assert not np.array_equal(ours, one)  # the second prompt did something
    bad = client.post("/v1/generate", json={**body, "ip_adapters": [*body["ip_adapters"],
                                                                    {"name": "x", "images": ["x"]}]})
    assert bad.status_code == 422 and "no IP-Adapter named 'x'" in bad.text
    bad = client.post("/v1/generate", json={**body, "ip_adapters": [{"name": "shapes-ip-adapter",
                                                                     "images": ["not base64!"]}]})
    assert bad.status_code == 422 and "ip_adapters[0].images[0]" in bad.text
