"""One FLUX transformer forward: diffstudio vs diffusers' FluxTransformer2DModel, same weights.

FLUX.1 width (hidden 3072 = 24 heads x 128, MLP x4, T5 context 4096, CLIP vector 768) at reduced
depth (2 double + 4 single blocks, of the release's 19 + 38), at 512x512 pixels: 1024 image tokens
plus 512 text tokens, batch 1, guidance-distilled (dev). Our model holds the diffusers tensors
(converted; the fused qkv / linear1 weights are concatenations, everything else shared). One
warm-up forward each, then timed forwards alternating ours / diffusers so that load from other
processes hits both alike; medians and the ratio ours / diffusers (< 1 = faster) are printed.

Targets (the issue): ratio <= 0.9 in fp32, <= 0.75 in bf16.

    python benchmarks/bench_flux.py                       # fp32 and bf16, full width
    python benchmarks/bench_flux.py --dtypes bf16 --repeats 3
    python benchmarks/bench_flux.py --tiny                # seconds-long smoke run at a small width
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from diffstudio.convert.flux import flux_from_diffusers
from diffstudio.detect.flux import config_from_diffusers
from diffstudio.models.flux import FluxTransformer, image_ids, pack_latents

FLUX_WIDTH = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
TINY = {**FLUX_WIDTH, "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(config: dict, dtype: torch.dtype, device: str):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = FluxTransformer(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()), assign=True)
    return ours.requires_grad_(False), ref.requires_grad_(False)


def make_inputs(config: dict, pixels: int, text_tokens: int, dtype, device, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    side = pixels // 8
    latent = torch.randn(batch, 16, side, side, generator=g)
    return dict(img=pack_latents(latent).to(device, dtype), img_ids=image_ids(side, side).to(device),
                txt=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g).to(device, dtype),
                txt_ids=torch.zeros(text_tokens, 3, device=device),
                timesteps=torch.full((batch,), 0.7, device=device),
                y=torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
                guidance=torch.full((batch,), 3.5, device=device))


def timed(fn, sync) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call. CPU time is the steadier of the two
    on a shared machine; on a GPU only the wall time means anything."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(name: str, config: dict, args, sync) -> None:
    dtype = DTYPES[name]
    ours, ref = build(config, dtype, args.device)
    x = make_inputs(config, args.pixels, args.text_tokens, dtype, args.device)

    def run_ours():
        return ours(**x)

    def run_ref():
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                   return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_ref()  # warm-up (and the agreement check)
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(run_ours, sync))
            t_ref.append(timed(run_ref, sync))
    for i, what in ((0, "wall"), (1, "cpu")):
        mo, mr = statistics.median(t[i] for t in t_ours), statistics.median(t[i] for t in t_ref)
        print(f"{name:<6}{what:<6}{mo:>9.3f}{mr:>13.3f}{mo / mr:>8.2f}{err:>10.1e}", flush=True)


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # silence the ".to(dtype)" advice meant for from_pretrained
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--pixels", type=int, default=512, help="image side in pixels (512: 1024 image tokens)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (dev: 512)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="2 heads of 128 instead of 24 (smoke test)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TINY if args.tiny else FLUX_WIDTH
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"hidden {config['num_attention_heads'] * config['attention_head_dim']}, blocks "
          f"{config['num_layers']} + {config['num_single_layers']}, {(args.pixels // 16) ** 2} image + "
          f"{args.text_tokens} text tokens, batch 1")
    print(f"{'dtype':<6}{'time':<6}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for name in args.dtypes:
        compare(name, config, args, sync)


if __name__ == "__main__":
    main()
