"""Peak memory of a video render against its length: flat, since only the latents grow with the frames.

Each render runs in a fresh process (so one render's peak is not another's) on the packaged Shapes demo model
with a random tiny motion module: text to video, then video to video reading the text-to-video output as its
input, each written to an .mp4 as a stream. The parent reads each child's peak resident set size
(``ru_maxrss``) and prints one row per render, and for each mode the ratio of the longest render's peak to the
shortest's. For contrast, ``--list`` adds renders that return their frames as a Python list of PIL images
(which must grow: the frames are the result).

    OMP_NUM_THREADS=1 python benchmarks/video_memory.py --list               # 32 and 256 frames at 128x128
    OMP_NUM_THREADS=1 python benchmarks/video_memory.py --frames 16,64 --steps 1             # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def child(args) -> None:
    import torch

    import diffstudio
    from diffstudio.models.motion import MotionConfig, MotionModules

    torch.set_num_threads(args.threads)
    models = diffstudio.load()
    unet = models.configs["unet"]
    config = MotionConfig(level_channels=[m * unet.model_channels for m in unet.channel_mult],
                          modules_per_level=list(unet.num_res_blocks))
    torch.manual_seed(0)
    motion = MotionModules(config).eval()
    with torch.no_grad():
        for p in motion.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    models.components["motion"], models.configs["motion"] = motion, config
    pipe = diffstudio.VideoPipeline(models)
    common = dict(width=args.size, height=args.size, steps=args.steps, cfg_scale=3.0, progress=False)
    started = time.time()
    if args.mode == "t2v":
        pipe("a red circle moving to the right", num_frames=args.count, output=args.output, **common)
    elif args.mode == "v2v":
        pipe("a blue circle", init_video=args.input, num_frames=args.count, strength=0.5, output=args.output,
             **common)
    else:  # the frames as a list in memory
        frames = pipe("a red circle moving to the right", num_frames=args.count, **common)
        assert len(frames) == args.count
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": round(time.time() - started, 1), "peak_mib": round(peak_kib / 1024, 1)}))


def run_child(mode: str, count: int, args, output: str, source: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--count", str(count), "--size", str(args.size),
               "--steps", str(args.steps), "--threads", str(args.threads), "--output", output]
    if source is not None:
        command += ["--input", source]
    # glibc's dynamic mmap threshold lets identical runs peak 20 % apart (a freed large block raises the
    # threshold, and later large blocks stay in the heap); a fixed threshold returns every large block.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{mode} {count} frames failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="32,256", help="comma-separated video lengths")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="also renders returned as a list of frames")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    import torch

    counts = [int(c) for c in args.frames.split(",")]
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"render: Shapes demo model + random tiny motion module, {args.size}x{args.size}, {args.steps} steps, "
          "CFG, context 16 / stride 8, written to .mp4")
    modes = ["t2v", "v2v"] + (["list"] if args.list else [])
    peaks: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as scratch:
        print("| mode | frames | peak RSS (MiB) | seconds |\n|---|---|---|---|")
        for count in counts:
            t2v = os.path.join(scratch, f"t2v_{count}.mp4")
            for mode in modes:
                output = t2v if mode == "t2v" else os.path.join(scratch, f"{mode}_{count}.mp4")
                result = run_child(mode, count, args, output, source=t2v if mode == "v2v" else None)
                peaks[mode].append(result["peak_mib"])
                print(f"| {mode} | {count} | {result['peak_mib']} | {result['seconds']} |", flush=True)
    for mode, values in peaks.items():
        print(f"{mode}: peak at {counts[-1]} frames / peak at {counts[0]} frames = {values[-1] / values[0]:.3f}")


if __name__ == "__main__":
    main()
