"""The server's parts without HTTP: the models-folder catalog, the job queue and its files, the name mapping."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")

import diffstudio  # noqa: E402
from diffstudio.errors import InvalidInputError, InvalidSizeError, ModelNotFoundError  # noqa: E402
from diffstudio.server.catalog import DEMO_NAME, Catalog  # noqa: E402
from diffstudio.server.checks import sampler_and_scheduler  # noqa: E402
from diffstudio.server.jobs import Job, JobQueue, QueueClosedError, QueueFullError  # noqa: E402
from tests.server_fixtures import controlnet_state_dict, lora_state_dict  # noqa: E402

# -- catalog ---------------------------------------------------------------------------------------

def test_the_catalog_places_files_by_folder_and_by_content(tmp_path):
    from safetensors.torch import save_file

    models = diffstudio.load()
    root = tmp_path / "models"
    for folder in ("Lora/styles", "ControlNet", "misc", "sd15-diffusers", "cn-diffusers"):
        (root / folder).mkdir(parents=True)
    (root / "Lora" / "styles" / "ink.ckpt").write_bytes(b"\x80 by folder, never opened")
    save_file(lora_state_dict(), str(root / "misc" / "flat.safetensors"))  # a LoRA by its keys
    save_file(controlnet_state_dict(models), str(root / "misc" / "edges.safetensors"))  # a ControlNet by its keys
    save_file({k: v.contiguous() for k, v in models.vae.state_dict().items()}, str(root / "misc" / "vae.safetensors"))
    (root / "old.ckpt").write_bytes(b"\x80 a pickle")
    (root / "sd15-diffusers" / "model_index.json").write_text("{}")
    (root / "cn-diffusers" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (root / "misc" / "notes.txt").write_text("not a model")
    outside = tmp_path / "outside.safetensors"
    save_file(lora_state_dict(), str(outside))
    (root / "Lora" / "linked.safetensors").symlink_to(outside)  # a link out of the folder: not listed

    catalog = Catalog.scan(root)
    assert sorted(catalog.checkpoints) == sorted([DEMO_NAME, "old.ckpt", "sd15-diffusers"])  # the lone VAE is not one
    assert sorted(catalog.loras) == ["flat", "ink"]
    assert sorted(catalog.controlnets) == ["cn-diffusers", "edges"]
    assert catalog.controlnets["edges"].family == "sd15"
    assert catalog.default_checkpoint == "old.ckpt"
    assert catalog.checkpoint("old [abc123]").name == "old.ckpt"  # by stem, an A1111 title's hash dropped
    assert catalog.lora_dirs == [root / "Lora", root / "misc"]
    with pytest.raises(ModelNotFoundError, match="no checkpoint named"):
        catalog.checkpoint("../outside.safetensors")
    with pytest.raises(InvalidInputError, match="not a LoRA of this server"):
        catalog.check_lora_path("x", outside)
    assert Catalog.scan(None).default_checkpoint == DEMO_NAME


def test_the_catalog_lists_motion_modules_by_folder_and_by_content(tmp_path):
    import shutil

    from diffstudio.server.catalog import DEMO_MOTION

    demo_motion = Catalog.scan(None).motion_module(DEMO_MOTION).path
    root = tmp_path / "models"
    (root / "AnimateDiff").mkdir(parents=True)
    (root / "misc").mkdir()
    (root / "AnimateDiff" / "mm_sd_v15_v2.ckpt").write_bytes(b"\x80 by folder, never opened")
    shutil.copy(demo_motion, root / "misc" / "moves.safetensors")  # a motion module by its keys
    catalog = Catalog.scan(root)
    assert sorted(catalog.motion_modules) == sorted([DEMO_MOTION, "mm_sd_v15_v2", "moves"])
    assert "moves" not in catalog.checkpoints
    assert catalog.motion_module("moves.safetensors").path.name == "moves.safetensors"
    with pytest.raises(InvalidInputError, match="no motion module named"):
        catalog.motion_module("../outside")


def test_a_missing_models_folder_is_a_named_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="models folder not found"):
        Catalog.scan(tmp_path / "nothing")


# -- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, scheduler, expected", [
    ("Euler a", None, ("euler_ancestral", None)),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),  # A1111 before 1.9 folded the schedule in
    ("DPM++ 2M Karras", "Exponential", ("dpmpp_2m", "exponential")),  # an explicit schedule wins
    ("dpmpp_2m", "SGM Uniform", ("dpmpp_2m", "sgm_uniform")),
    (None, "Automatic", (None, None)),  # the model's defaults
    ("", "karras", (None, "karras")),
])
def test_a1111_sampler_and_schedule_names_map_to_ours(sampler, scheduler, expected):
    assert sampler_and_scheduler(sampler, scheduler) == expected


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(InvalidInputError, match="'Euler a'"):
        sampler_and_scheduler("DPM2", None)  # an A1111 sampler diffstudio does not have
    with pytest.raises(InvalidInputError, match="karras"):
        sampler_and_scheduler(None, "fastest")


def test_decoding_refuses_an_image_over_the_pixel_limit_before_reading_it():
    import base64
    import io

    from PIL import Image

    from diffstudio.server.payloads import decode_image

    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")  # 9 MP, a few KB compressed
    with pytest.raises(InvalidSizeError, match="9000000 pixels"):
        decode_image(base64.b64encode(buffer.getvalue()).decode(), "init", max_pixels=1_000_000)


# -- the job queue -------------------------------------------------------------------------------------

class Gate:
    """An execute function that holds each job until released, recording the order jobs ran in."""

    def __init__(self):
        self.ran: list[str] = []
        self.release = threading.Event()

    def __call__(self, job: Job) -> None:
        self.ran.append(job.id)
        while not self.release.wait(0.01):
            job.check_stop()
        if job.params.get("fail"):
            raise InvalidInputError("a client's mistake")
        if job.params.get("bug"):
            raise RuntimeError("a bug")
        job.outputs = [f"{job.id}-0.png"]


def wait_running(queue: JobQueue, job: Job) -> None:
    deadline = time.time() + 10
    while queue.current is not job:
        assert time.time() < deadline
        time.sleep(0.005)


def test_the_queue_is_bounded_runs_in_order_and_persists(tmp_path):
    gate = Gate()
    queue = JobQueue(gate, tmp_path, size=2)
    try:
        first = queue.submit(Job.new("t", {}, None))
        wait_running(queue, first)
        waiting = [queue.submit(Job.new("t", {"fail": i == 0, "bug": i == 1}, None)) for i in range(2)]
        with pytest.raises(QueueFullError) as full:
            queue.submit(Job.new("t", {}, None))
        assert full.value.retry_after >= 1
        assert json.loads((tmp_path / f"{first.id}.json").read_text())["state"] == "running"
        gate.release.set()
        for job in (first, *waiting):
            assert job.done.wait(10)
        assert gate.ran == [first.id, waiting[0].id, waiting[1].id]
        assert (first.state, first.outputs) == ("done", [f"{first.id}-0.png"])
        assert (waiting[0].state, waiting[0].error_type) == ("failed", "InvalidInputError")
        assert (waiting[1].state, waiting[1].error_type) == ("failed", "InternalError")  # the worker goes on
        saved = json.loads((tmp_path / f"{first.id}.json").read_text())
        assert saved["state"] == "done" and saved["outputs"] == first.outputs
    finally:
        queue.close()


def test_interrupting_a_running_and_a_queued_job(tmp_path):
    gate = Gate()
    queue = JobQueue(gate, tmp_path, size=2)
    try:
        running, queued = queue.submit(Job.new("t", {}, None)), None
        wait_running(queue, running)
        queued = queue.submit(Job.new("t", {}, None))
        queue.interrupt(queued.id)
        queue.interrupt()  # the running one
        assert running.done.wait(10) and queued.done.wait(10)
        assert running.state == queued.state == "interrupted"
        assert gate.ran == [running.id]  # the queued one never ran
    finally:
        queue.close()


def test_a_closed_queue_refuses_new_jobs_instead_of_holding_them_forever(tmp_path):
    gate = Gate()
    gate.release.set()
    queue = JobQueue(gate, tmp_path, size=2)
    queue.close()
    with pytest.raises(QueueClosedError, match="closed"):
        queue.submit(Job.new("t", {}, None))
    assert gate.ran == []


def test_a_restarted_queue_reports_old_jobs_and_fails_the_unfinished(tmp_path):
    gate = Gate()
    gate.release.set()
    queue = JobQueue(gate, tmp_path, size=2)
    done = queue.submit(Job.new("t", {"prompt": "x"}, None))
    assert done.done.wait(10)
    queue.close()
    (tmp_path / f"{'a' * 32}.json").write_text(json.dumps({"id": "a" * 32, "kind": "t", "state": "queued"}))

    again = JobQueue(gate, tmp_path, size=2)
    try:
        old = again.get(done.id)
        assert (old.state, old.outputs, old.params) == ("done", done.outputs, {"prompt": "x"})
        lost = again.get("a" * 32)
        assert lost.state == "failed" and "stopped" in lost.error
        assert again.get("../../etc/passwd") is None and again.get("b" * 32) is None
    finally:
        again.close()


def test_serve_listens_on_loopback_unless_told_otherwise():
    from diffstudio.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.queue_size, args.models, args.token) == ("127.0.0.1", 7860, 8, None, None)
    args = build_parser().parse_args(["serve", "--models", "m", "--outputs", "o", "--queue-size", "3", "--token", "t"])
    assert (args.models, args.outputs, args.queue_size, args.token) == ("m", "o", 3, "t")
    assert build_parser().parse_args(["serve", "--annotators", "weights"]).annotators == "weights"
