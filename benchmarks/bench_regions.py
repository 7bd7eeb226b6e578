"""Cost of region prompts: network calls, batch rows and seconds per sampling step, for 1, 2 and
4 regions in latent and attention mode, against plain generation.

Runs on the Shapes demo architecture (`diffstudio.load()`: the trained weights when built, else
the seeded untrained ones: the cost is the same). Regions are vertical strips.

    python benchmarks/bench_regions.py                          # 64 x 64 (the demo size), 6 steps
    python benchmarks/bench_regions.py --size 128 --steps 10 --max-batch 4
    python benchmarks/bench_regions.py --smoke                  # the smallest run (a few seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import diffstudio
from diffstudio import Region, RegionLayout


def strips(count: int) -> list[Region]:
    prompts = ["a red circle", "a blue square", "a green star", "a yellow triangle"]
    return [Region(prompts[i % len(prompts)], box=(i / count, 0.0, (i + 1) / count, 1.0)) for i in range(count)]


def measure(pipe, size: int, steps: int, regions, mode: str) -> dict:
    rows, stamps = [], []

    def count(module, args):  # a pre-hook that returns None leaves the inputs alone
        rows.append(len(args[0]))

    hook = pipe.models.denoiser.register_forward_pre_hook(count)
    try:
        pipe("two shapes, white background", width=size, height=size, steps=steps, seed=0, progress=False,
             regions=regions, region_mode=mode, callback=lambda *a: stamps.append(time.perf_counter()))
    finally:
        hook.remove()
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step carries warm-up: left out
    return {"calls": len(rows) / steps, "rows": sum(rows) / steps,
            "seconds": statistics.median(per_step) if per_step else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4], help="numbers of regions")
    parser.add_argument("--max-batch", type=int, default=None, help="latent mode: rows per network call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="smallest run: 32 px, 3 steps, 1 and 2 regions")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.counts = 32, 3, [1, 2]
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the demo weights are not built": the untrained ones cost the same
        pipe = diffstudio.Pipeline(diffstudio.load())
    print(f"torch {torch.__version__}, {pipe.models.sources.get('unet', 'demo')}, {args.size}x{args.size}, "
          f"{args.steps} steps, cfg on, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<10}{'regions':>8}{'calls/step':>12}{'rows/step':>11}{'s/step':>9}{'x plain':>9}")
    base = measure(pipe, args.size, args.steps, None, "latent")
    print(f"{'plain':<10}{0:>8}{base['calls']:>12.0f}{base['rows']:>11.0f}{base['seconds']:>9.4f}{1.0:>9.2f}")
    for mode in ("latent", "attention"):
        for count in args.counts:
            layout = RegionLayout(strips(count), max_batch=args.max_batch)
            r = measure(pipe, args.size, args.steps, layout, mode)
            print(f"{mode:<10}{count:>8}{r['calls']:>12.0f}{r['rows']:>11.0f}{r['seconds']:>9.4f}"
                  f"{r['seconds'] / base['seconds']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
