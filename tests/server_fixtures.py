"""Helpers for the server tests: a live server on a loopback port, a models folder, base64 images."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import torch
from PIL import Image

LOOPBACK = "127.0.0.1"
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TO_K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"


class LiveServer:
    """uvicorn serving ``app`` in a thread on 127.0.0.1 and a port the OS picks; ``stop()`` shuts it down
    (the app's lifespan closes its job queue)."""

    def __init__(self, app):
        import httpx
        import uvicorn

        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] not in ("queued", "running"):
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(data: str | bytes) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def picture(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.full((size, size, 3), 255, np.uint8)
    array[size // 4: 3 * size // 4, size // 8: size // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(array)


def half_mask(size: int = 64) -> Image.Image:
    array = np.zeros((size, size), np.uint8)
    array[:, size // 2:] = 255  # repaint the right half
    return Image.fromarray(array, "L")


def lora_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA + LoCon for the demo model's first level (width 64, context 64), strong enough to show."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {f"{TO_Q}.lora_down.weight": r(4, 64), f"{TO_Q}.lora_up.weight": r(64, 4),
            f"{TO_Q}.alpha": torch.tensor(4.0),
            f"{TO_K2}.lora_down.weight": r(4, 64), f"{TO_K2}.lora_up.weight": r(64, 4),
            f"{CONV1}.lora_down.weight": r(4, 64, 3, 3) * 0.2, f"{CONV1}.lora_up.weight": r(64, 4, 1, 1) * 0.2}


def controlnet_state_dict(models, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ControlNet for the demo UNet (cldm names), its zero convolutions made non-zero."""
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel

    config = ControlNetConfig.from_unet(models.configs["unet"], hint_block_channels=[16, 32, 32, 32])
    torch.manual_seed(seed)
    model = ControlNetModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name:
                p.normal_(0, 0.3)
    return {f"control_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
