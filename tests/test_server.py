"""The HTTP server against a live uvicorn on 127.0.0.1: the A1111 routes and /v1 give the Python API's images
for the same recipe, bad requests are 4xx with a message and the server goes on serving, a bounded queue
answers 200 or 429 under load and loses nothing, jobs survive a restart, the token is checked, and no
request reaches a file outside the models and outputs folders. The demo model at 64x64, 2 steps."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest
from PIL import ImageOps

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import diffstudio  # noqa: E402
from diffstudio.pipeline.control import ControlNetUnit  # noqa: E402
from diffstudio.server.app import create_app  # noqa: E402
from tests.server_fixtures import (  # noqa: E402
    LiveServer,
    b64_png,
    controlnet_state_dict,
    half_mask,
    lora_state_dict,
    picture,
    pixels,
)

FAST = {"steps": 2, "width": 64, "height": 64}
MAX_PIXELS = 128 * 128
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def models():
    return diffstudio.load()  # the packaged demo model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, models):
    """A models folder in A1111's layout (plus a LoRA found by its keys and a broken checkpoint), a LoRA outside
    it, and an outputs folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("server")
    models_dir = root / "models"
    (models_dir / "Lora").mkdir(parents=True)
    (models_dir / "ControlNet").mkdir()
    (models_dir / "misc").mkdir()
    save_file(lora_state_dict(0), str(models_dir / "Lora" / "flat.safetensors"))
    save_file(lora_state_dict(1), str(models_dir / "misc" / "found.safetensors"))
    save_file(controlnet_state_dict(models, seed=3), str(models_dir / "ControlNet" / "shapes_edges.safetensors"))
    (models_dir / "broken.ckpt").write_bytes(b"\x80\x02 not a checkpoint")
    save_file(lora_state_dict(2), str(root / "outside.safetensors"))
    return {"root": root, "models": models_dir, "outputs": root / "outputs"}


def demo_or_load(models):
    """The loader of the test servers: the demo model loaded once for the module; anything else from its file."""
    from diffstudio.server.model_cache import load_entry

    return lambda entry: models if entry.name == "shapes-sd" else load_entry(entry)


@pytest.fixture(scope="module")
def server(folders, models):
    app = create_app(folders["models"], folders["outputs"], queue_size=4, max_pixels=MAX_PIXELS,
                     max_body_bytes=MAX_BODY, loader=demo_or_load(models))
    live = LiveServer(app)
    assert live.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "broken.ckpt"  # the folder's first
    assert live.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-sd"}).status_code == 200
    yield live
    live.stop()


@pytest.fixture(scope="module")
def pipe(models, server):
    return diffstudio.Pipeline(models, lora_dirs=server.app.state.server.catalog.lora_dirs)


def txt2img(server, **fields):
    return server.client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", **FAST, **fields})


# -- the same images as the Python API ----------------------------------------------------------------

def test_txt2img_gives_the_python_api_images_and_a1111_info(server, pipe):
    r = txt2img(server, seed=7, batch_size=2, n_iter=2, sampler_name="DPM++ 2M Karras", cfg_scale=2.5,
                negative_prompt="blue", save_images=True)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])  # A1111's info is a JSON string
    assert info["all_seeds"] == [7, 8, 9, 10] and info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"]["Schedule type"] == "Karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    assert info["ignored_fields"] == ["save_images"]
    run = dict(**FAST, cfg_scale=2.5, sampler="dpmpp_2m", scheduler="karras", batch_size=2, progress=False)
    expected = pipe("a red circle", "blue", seed=7, **run) + pipe("a red circle", "blue", seed=9, **run)
    assert len(body["images"]) == 4
    for got, want in zip(body["images"], expected):
        assert np.array_equal(pixels(got), np.asarray(want))
    png = server.client.post("/sdapi/v1/png-info", json={"image": body["images"][1]}).json()
    assert png["parameters"]["seed"] == 8 and "diffstudio" in png["items"]


def test_img2img_and_inpainting_give_the_python_api_images(server, pipe):
    init, mask = picture(1), half_mask()
    run = dict(**FAST, seed=3, progress=False)
    r = server.client.post("/sdapi/v1/img2img", json={"prompt": "a blue square", "init_images": [b64_png(init)],
                                                      "denoising_strength": 0.6, "seed": 3, **FAST})
    assert r.status_code == 200, r.text
    want = pipe("a blue square", init_image=init, strength=0.6, **run)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), np.asarray(want))
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.6

    inverted = ImageOps.invert(mask)  # sent inverted, with inpainting_mask_invert: the server turns it back
    r = server.client.post("/sdapi/v1/img2img", json={
        "prompt": "a blue square", "init_images": ["data:image/png;base64," + b64_png(init)], "mask": b64_png(inverted),
        "inpainting_mask_invert": 1, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False,
        "denoising_strength": 0.9, "seed": 3, **FAST})
    assert r.status_code == 200, r.text
    want = pipe("a blue square", init_image=init, mask=mask, strength=0.9, **run)[0]
    got = pixels(r.json()["images"][0])
    assert np.array_equal(got, np.asarray(want))
    assert np.array_equal(got[:, :32], np.asarray(init)[:, :32])  # the kept half is the init image


def test_v1_job_with_regions_lora_and_controlnet_gives_the_python_api_image(server, pipe, folders):
    hint, mask = picture(5), half_mask()
    r = server.client.post("/v1/generate", json={
        "prompt": "white background", "seed": 11, "sampler": "Euler a", **FAST,
        "regions": [{"prompt": "a red circle", "box": [0, 0, 0.5, 1]},
                    {"prompt": "a blue square", "mask": b64_png(mask), "feather": 0.05}],
        "loras": [{"name": "flat", "strength": 0.8}],
        "controlnets": [{"model": "shapes_edges", "image": b64_png(hint), "scale": 0.7, "preprocess": "canny"}]})
    assert r.status_code == 202, r.text
    job = server.wait_job(r.json()["id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["step"] == job["steps"] == 2
    got = server.client.get(job["urls"][0])
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    unit = ControlNetUnit(str(folders["models"] / "ControlNet" / "shapes_edges.safetensors"), hint, scale=0.7,
                          preprocess="canny")
    want = pipe("white background <lora:flat:0.8>", seed=11, sampler="euler_ancestral", **FAST, progress=False,
                regions=[diffstudio.Region("a red circle", box=(0, 0, 0.5, 1)),
                         diffstudio.Region("a blue square", mask=mask, feather=0.05)],
                controlnets=[unit])[0]
    assert np.array_equal(pixels(got.content), np.asarray(want))
    recipe = job["info"]["recipes"][0]["extra"]
    assert recipe["controlnets"][0]["model"] == "shapes_edges.safetensors" and "regions" in recipe


# -- lists and settings --------------------------------------------------------------------------------

def test_lists_settings_and_the_openapi_schema(server):
    c = server.client
    titles = [m["title"] for m in c.get("/sdapi/v1/sd-models").json()]
    assert titles == ["broken.ckpt", "shapes-sd"]
    assert sorted(x["name"] for x in c.get("/sdapi/v1/loras").json()) == ["flat", "found"]
    assert {"name": "Euler a", "aliases": ["euler_ancestral"], "options": {}} in c.get("/sdapi/v1/samplers").json()
    assert "karras" in [s["name"] for s in c.get("/sdapi/v1/schedulers").json()]
    assert c.get("/v1/models").json()["controlnets"] == ["shapes_edges"]
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-sd [0123abcd]"}).status_code == 200
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-sd"
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/jobs/{job_id}", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"} <= set(paths)


def test_progress_and_interrupt(server):
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=txt2img(server, steps=150, batch_size=4)))
    worker.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = server.client.get("/sdapi/v1/progress").json()
        if state["state"]["sampling_step"] > 0:
            break
        time.sleep(0.02)
    assert 0 < state["progress"] < 1 and state["state"]["sampling_steps"] == 150
    assert server.client.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(60)
    r = answer["r"]
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
    assert server.client.get("/sdapi/v1/progress").json()["progress"] == 0.0


# -- bad requests: 4xx with a message, and the server goes on --------------------------------------------

BAD_REQUESTS = {
    "malformed JSON": ("post", "/sdapi/v1/txt2img", {"content": b'{"prompt": "x",', "headers": {
        "content-type": "application/json"}}, 422, "not valid JSON"),
    "bad base64": ("post", "/sdapi/v1/img2img", {"json": {"init_images": ["not base64!"], **FAST}}, 422, "base64"),
    "base64 of no image": ("post", "/sdapi/v1/img2img", {"json": {"init_images": [
        base64.b64encode(b"hello").decode()], **FAST}}, 422, "not an image"),
    "huge output size": ("post", "/sdapi/v1/txt2img", {"json": {"width": 4096, "height": 4096, "steps": 2}}, 422,
                         "pixels"),
    "huge init image": ("post", "/sdapi/v1/img2img", {"json": {"init_images": [b64_png(picture(0, 256))], **FAST}},
                        422, "pixels"),
    "unknown sampler": ("post", "/sdapi/v1/txt2img", {"json": {"sampler_name": "Euler z", **FAST}}, 422,
                        "unknown sampler"),
    "unknown scheduler": ("post", "/v1/generate", {"json": {"prompt": "x", "scheduler": "fast", **FAST}}, 422,
                          "unknown scheduler"),
    "a huge width with the model's height (found in the job)": ("post", "/sdapi/v1/txt2img", {"json": {
        "width": 4096, "steps": 2}}, 422, "pixels"),
    "a seed out of range": ("post", "/v1/generate", {"json": {"prompt": "x", "seed": 2**64}}, 422, "seed"),
    "NaN": ("post", "/sdapi/v1/txt2img", {"content": b'{"cfg_scale": NaN}', "headers": {
        "content-type": "application/json"}}, 422, "cfg_scale"),
    "a size the model cannot take (found in the job)": ("post", "/sdapi/v1/txt2img", {"json": {
        "width": 60, "height": 64, "steps": 2}}, 422, "multiples of 8"),
    "a checkpoint that does not load (found in the job)": ("post", "/sdapi/v1/txt2img", {"json": {
        "override_settings": {"sd_model_checkpoint": "broken.ckpt"}, **FAST}}, 422, "broken.ckpt"),
    "an unsupported A1111 feature": ("post", "/sdapi/v1/txt2img", {"json": {"enable_hr": True, **FAST}}, 422,
                                     "enable_hr"),
    "too many steps": ("post", "/v1/generate", {"json": {"prompt": "x", "steps": 10_000}}, 422, "limit"),
    "too many images": ("post", "/sdapi/v1/txt2img", {"json": {"batch_size": 8, "n_iter": 8, **FAST}}, 422,
                        "images"),
    "a wrong type": ("post", "/sdapi/v1/txt2img", {"json": {"steps": "many"}}, 422, "steps"),
    "an unknown /v1 field": ("post", "/v1/generate", {"json": {"prompt": "x", "colour": "red"}}, 422, "colour"),
    "a bad region box": ("post", "/v1/generate", {"json": {"prompt": "x", "regions": [
        {"prompt": "y", "box": [0.5, 0, 0.2, 1]}]}}, 422, "box"),
    "an unknown LoRA tag": ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "<lora:nothere:1>", **FAST}}, 422,
                            "nothere"),
    "an unknown option": ("post", "/sdapi/v1/options", {"json": {"sd_vae": "x"}}, 422, "sd_vae"),
    "a body over the limit": ("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x" * (MAX_BODY + 10)}}, 413,
                              "limit"),
    "a streamed body over the limit": ("post", "/sdapi/v1/txt2img", {"content": (b"x" * 65536 for _ in range(20)),
                                                                    "headers": {"content-type": "application/json"}},
                                       413, "limit"),
    "an unknown job": ("get", "/v1/jobs/" + "0" * 32, {}, 404, "no job"),
    "an annotator whose weight file is not on the server": ("post", "/v1/generate", {"json": {
        "prompt": "x", "controlnets": [{"model": "shapes_edges", "image": b64_png(picture(1)), "preprocess": "hed"}],
        **FAST}}, 422, "ControlNetHED.pth"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_4xx_with_a_message(server, case, monkeypatch):
    monkeypatch.delenv("DIFFSTUDIO_ANNOTATORS", raising=False)
    method, path, kwargs, status, words = BAD_REQUESTS[case]
    r = getattr(server.client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_the_server_still_serves_after_the_bad_requests(server):
    assert txt2img(server, seed=1).status_code == 200


# -- files: only the catalog's and the outputs ---------------------------------------------------------

@pytest.mark.parametrize("kind, path, body", [
    ("output", "/v1/outputs/..%2F..%2Foutside.safetensors", None),
    ("output", "/v1/outputs/%2e%2e%2fmodels%2fbroken.ckpt", None),
    ("output", "/v1/outputs/jobs", None),
    ("checkpoint", "/sdapi/v1/options", {"sd_model_checkpoint": "../outside.safetensors"}),
    ("checkpoint", "/v1/generate", {"prompt": "x", "model": "/etc/passwd"}),
    ("lora tag", "/sdapi/v1/txt2img", {"prompt": "<lora:../../outside:1>", **FAST}),
    ("lora tag", "/sdapi/v1/txt2img", {"prompt": "<lora:{root}/outside.safetensors:1>", **FAST}),
    ("lora", "/v1/generate", {"prompt": "x", "loras": [{"name": "../../outside"}], **FAST}),
    ("controlnet", "/v1/generate", {"prompt": "x", "controlnets": [{"model": "../outside", "image": b64_png(
        picture())}], **FAST}),
    ("region mask", "/v1/generate", {"prompt": "x", "regions": [{"prompt": "y", "mask": "/etc/hostname"}]}),
])
def test_paths_outside_the_folders_are_refused(server, folders, kind, path, body):
    if body is None:
        r = server.client.get(path)
    else:
        body = json.loads(json.dumps(body).replace("{root}", str(folders["root"])))
        r = server.client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text  # a LoRA or ControlNet that loaded would have given 200 / 202
    assert r.json()["detail"]


# -- load, restart, token --------------------------------------------------------------------------------

def test_a_full_queue_answers_429_and_loses_no_request(server):
    """A long job holds the worker; 50 concurrent requests meet a queue of 4: exactly 4 are taken (answered
    200 once the long job is stopped), 46 get 429 with Retry-After; the server answers after."""
    c = server.client
    blocker = c.post("/v1/generate", json={"prompt": "x", **FAST, "steps": 150, "batch_size": 4}).json()["id"]
    deadline = time.time() + 60
    while c.get("/v1/status").json()["running"] != blocker:
        assert time.time() < deadline
        time.sleep(0.02)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            async def release():  # stop the long job once the burst has filled the queue
                while (await client.get("/v1/status")).json()["waiting"] < 4:
                    await asyncio.sleep(0.02)
                await client.delete(f"/v1/jobs/{blocker}")

            requests = [client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "seed": i, **FAST})
                        for i in range(50)]
            answers = await asyncio.wait_for(asyncio.gather(release(), *requests), 90)
            return answers[1:]

    started = time.time()
    answers = asyncio.run(burst())
    statuses = [a.status_code for a in answers]
    assert len(statuses) == 50 and set(statuses) <= {200, 429}
    assert statuses.count(200) == 4 and statuses.count(429) == 46
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    assert all(len(a.json()["images"]) == 1 for a in answers if a.status_code == 200)
    assert server.wait_job(blocker)["state"] == "interrupted"
    assert time.time() - started < 60
    assert txt2img(server, seed=2).status_code == 200


def test_finished_jobs_survive_a_restart(tmp_path):
    outputs = tmp_path / "outputs"
    first = LiveServer(create_app(None, outputs))  # the default loader: diffstudio.load of the demo's file
    try:
        job_id = first.client.post("/v1/generate", json={"prompt": "a green star", "seed": 5, **FAST}).json()["id"]
        job = first.wait_job(job_id)
        image = first.client.get(job["urls"][0]).content
    finally:
        first.stop()
    assert job["state"] == "done"
    lost = {"id": "f" * 32, "kind": "generate", "state": "running", "created": 0.0}  # running when it stopped
    (outputs / "jobs" / f"{'f' * 32}.json").write_text(json.dumps(lost))

    second = LiveServer(create_app(None, outputs))
    try:
        again = second.client.get(f"/v1/jobs/{job_id}").json()
        assert again["state"] == "done" and again["outputs"] == job["outputs"]
        assert second.client.get(again["urls"][0]).content == image
        stopped = second.client.get(f"/v1/jobs/{'f' * 32}").json()
        assert stopped["state"] == "failed" and stopped["error_type"] == "ServerStopped"
    finally:
        second.stop()


def test_the_token_is_required_when_set(tmp_path, models):
    live = LiveServer(create_app(None, tmp_path, token="s3cret", loader=demo_or_load(models)))
    try:
        c = live.client
        assert c.get("/sdapi/v1/options").status_code == 401
        assert c.get("/openapi.json", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("anyone", "s3cret")).status_code == 200  # A1111 --api-auth
        assert c.get("/sdapi/v1/options", auth=("anyone", "nope")).status_code == 401
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
    finally:
        live.stop()


def test_a_ui_mounts_on_the_same_app_behind_the_token(tmp_path):
    seen = {}

    def mount(app, state):
        seen["state"] = state

        @app.get("/")
        def page() -> dict:
            return {"ui": True, "queue": state.jobs.size}

    live = LiveServer(create_app(None, tmp_path, queue_size=3, token="t", ui=mount))
    try:
        assert seen["state"] is live.app.state.server
        assert live.client.get("/").status_code == 401
        auth = {"Authorization": "Bearer t"}
        assert live.client.get("/", headers=auth).json() == {"ui": True, "queue": 3}
        assert live.client.get("/v1/status", headers=auth).status_code == 200  # the APIs stay beside it
    finally:
        live.stop()
