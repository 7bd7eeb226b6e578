"""Memory estimates (diffstudio/memory/estimate.py) against measurement, on real-width layouts with random weights.

Each case runs in a fresh process: the module is built on the meta device at a released layout's widths, its
weights are materialised in the compute dtype (filled, so every page is resident), then one call runs. The child
reports the weights' bytes, the estimate of the call's activations, the peak of live tensor bytes during the call
(``memory.measure.TensorPeak``: what a GPU allocator's max_memory_allocated would count) and the process's peak
resident set above what it held before the call (VmHWM - VmRSS, /proc/self/status). DiTs keep their release's
width and run one block of each kind (a DiT's activations do not depend on its depth; its weights are computed
from the full-depth config).

    OMP_NUM_THREADS=2 python benchmarks/memory_plan.py --cases sd35large-512,flux-512          # bf16
    OMP_NUM_THREADS=2 python benchmarks/memory_plan.py --dtype fp32 --cases unet-sd15-256,unet-sdxl-512,vae-256,vae-512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's diffstudio

GIB = 1024 ** 3


def _materialise(module, dtype):
    import torch

    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval().requires_grad_(False)


def _flux(size: int, dtype):
    import torch

    from diffstudio.models.flux import FluxConfig, FluxTransformer

    config = FluxConfig(depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        model = FluxTransformer(config)
    model = _materialise(model, dtype)
    lat, txt = size // 16, 512
    ids = torch.zeros(1, lat * lat, 3)
    ids[0, :, 1] = torch.arange(lat).repeat_interleave(lat)
    ids[0, :, 2] = torch.arange(lat).repeat(lat)
    inputs = dict(img=torch.randn(1, lat * lat, 64, dtype=dtype), img_ids=ids,
                  txt=torch.randn(1, txt, 4096, dtype=dtype), txt_ids=torch.zeros(1, txt, 3),
                  timesteps=torch.tensor([0.5], dtype=dtype),
                  y=torch.randn(1, 768, dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype))
    from diffstudio.memory.estimate import denoiser_activation_bytes

    estimate = denoiser_activation_bytes("flux_dit", config, size, size, text_tokens=txt, batch=1, dtype=dtype)
    return model, (lambda: model(**inputs)), estimate


def _mmdit(size: int, dtype):
    import torch

    from diffstudio.models.mmdit import MMDiT, MMDiTConfig

    # SD3.5-large's widths (hidden 2432 = 64 x 38 heads, qk RMS norm), two joint blocks
    config = MMDiTConfig(depth=2, hidden_size=2432, num_heads=38, mlp_hidden_size=4 * 2432, qk_norm="rms")
    with torch.device("meta"):
        model = MMDiT(config)
    model = _materialise(model, dtype)
    batch, txt = 2, 77 + 256
    x = torch.randn(batch, 16, size // 8, size // 8, dtype=dtype)
    t, y, ctx = torch.full((batch,), 500.0, dtype=dtype), torch.randn(batch, 2048, dtype=dtype), \
        torch.randn(batch, txt, 4096, dtype=dtype)
    from diffstudio.memory.estimate import denoiser_activation_bytes

    estimate = denoiser_activation_bytes("mmdit", config, size, size, text_tokens=txt, batch=batch, dtype=dtype)
    return model, (lambda: model(x, t, y, ctx)), estimate


def _unet(size: int, dtype, layout: str):
    import torch

    from diffstudio.detect.unet import config_from_diffusers as unet_config_from_diffusers
    from diffstudio.models.unet import UNetModel
    from diffstudio.release_configs import SD15_UNET, SDXL_UNET

    config = unet_config_from_diffusers({"sd15": SD15_UNET, "sdxl": SDXL_UNET}[layout])
    with torch.device("meta"):
        model = UNetModel(config)
    model = _materialise(model, dtype)
    batch = 2  # classifier-free guidance: both halves in one call
    x = torch.randn(batch, 4, size // 8, size // 8, dtype=dtype)
    t = torch.full((batch,), 500.0, dtype=dtype)
    ctx = torch.randn(batch, 77, config.context_dim, dtype=dtype)
    extra = {"y": torch.randn(batch, config.adm_in_channels, dtype=dtype)} if config.adm_in_channels else {}
    from diffstudio.memory.estimate import denoiser_activation_bytes

    estimate = denoiser_activation_bytes("ldm_unet", config, size, size, text_tokens=77, batch=batch, dtype=dtype,
                                          device_type="cpu")  # (the chunked bf16 attention's scores on a CPU)
    return model, (lambda: model(x, t, ctx, **extra)), estimate


def _vae(size: int, dtype):
    import torch

    from diffstudio.models.vae import AutoencoderKL, VAEConfig

    config = VAEConfig()
    with torch.device("meta"):
        model = AutoencoderKL(config)
    model = _materialise(model, dtype)
    z = torch.randn(1, 4, size // 8, size // 8, dtype=dtype)
    from diffstudio.memory.estimate import vae_decode_bytes

    estimate = vae_decode_bytes(config, size, size, dtype=dtype, tiled=False)
    return model, (lambda: model.decode(z)), estimate


CASES = {
    "flux-512": lambda dtype: _flux(512, dtype),
    "flux-768": lambda dtype: _flux(768, dtype),
    "sd35large-512": lambda dtype: _mmdit(512, dtype),
    "unet-sd15-256": lambda dtype: _unet(256, dtype, "sd15"),
    "unet-sd15-512": lambda dtype: _unet(512, dtype, "sd15"),
    "unet-sdxl-512": lambda dtype: _unet(512, dtype, "sdxl"),
    "vae-256": lambda dtype: _vae(256, dtype),
    "vae-512": lambda dtype: _vae(512, dtype),
}


def child(name: str, threads: int, dtype_name: str) -> None:
    import torch

    from diffstudio.memory.measure import TensorPeak, process_memory

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model, call, estimate = CASES[name](dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = process_memory()["VmRSS"]
    start = time.perf_counter()
    with torch.inference_mode(), TensorPeak() as peak:
        call()
    seconds = time.perf_counter() - start
    hwm = process_memory()["VmHWM"]
    print(json.dumps({"case": name, "weights_mib": round(weights / 2 ** 20), "estimate_mib": round(estimate / 2 ** 20),
                      "tensor_peak_mib": round(peak.peak / 2 ** 20), "rss_peak_mib": round((hwm - before) / 2 ** 20),
                      "seconds": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.dtype)
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s), "
          f"torch {torch.__version__}, {args.dtype}; load average {os.getloadavg()[0]:.1f}")
    print("| case | weights | estimate | tensor peak | estimate / tensor peak | RSS peak above before | time |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(args.threads),
                              "--dtype", args.dtype],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = row["estimate_mib"] / max(row["tensor_peak_mib"], 1)
        print(f"| {name} | {row['weights_mib']} MiB | {row['estimate_mib']} MiB | {row['tensor_peak_mib']} MiB | "
              f"{ratio:.2f} | {row['rss_peak_mib']} MiB | {row['seconds']} s |", flush=True)


if __name__ == "__main__":
    main()
