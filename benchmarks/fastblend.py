"""FastBlend speed and memory: seconds per frame pair at several sizes, and the peak memory of a
whole streamed video.

A "frame pair" is one remap: pyramid patch matching of a source frame into a target frame plus the
voting remap, at the default settings (patch 5, 5 iterations per level, guide weight 10). Balanced
mode does 2 * window_size of them per output frame; fast mode about 2 * log2(window_size) + 2.
Frames are a synthetic textured scene moving 2 px per frame with a flickering "stylisation".

    python benchmarks/fastblend.py --sizes 128,256,512 --threads 1,2 --batch 8
    python benchmarks/fastblend.py --device cuda --sizes 128,256,512,1024 --batch 8
    python benchmarks/fastblend.py --memory --frames 300 --size 512 --mode fast --num-iter 1

``--memory`` runs one blend in a child process (frames spilled to disk, output encoded to a video
as it is made, as the CLI does) and reports that process's peak RSS; memory does not depend on
num_iter, so ``--num-iter 1`` keeps the run short.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Spinning OpenMP waits make torch 10-100x slower on a shared, busy CPU (see docs/fastblend.md);
# set before torch starts its threads. Pass OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class Scene:
    """A smooth texture moving (1, 2) px per frame, and a flickering "stylisation" of it.

    Frames are made on demand, so a long video never has to be in memory.
    """

    def __init__(self, frames: int, size: int, seed: int = 0):
        from scipy.ndimage import gaussian_filter

        self.size, self.seed = size, seed
        rng = np.random.default_rng(seed)
        canvas = gaussian_filter(rng.random((size + frames + 16, size + 2 * frames + 16, 3)), sigma=(2, 2, 0))
        self.canvas = ((canvas - canvas.min()) / (canvas.max() - canvas.min()) * 255).round().astype(np.uint8)

    def guide(self, t: int) -> np.ndarray:
        return self.canvas[8 + t:8 + t + self.size, 8 + 2 * t:8 + 2 * t + self.size]

    def style(self, t: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, t))
        style = np.clip(0.8 * (255.0 - self.guide(t)[..., [2, 0, 1]]) + 30, 0, 255)
        style = style + rng.uniform(-15, 15, (1, 1, 3)) + rng.normal(0, 6, style.shape)
        return np.clip(style, 0, 255).round().astype(np.uint8)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_pairs(size: int, batch: int, repeats: int, device: torch.device, num_iter: int) -> float:
    """Median seconds per frame pair, ``batch`` pairs (frames 5 apart) per call, as the modes call
    the remapper (on a CPU it matches large frames a few pairs at a time)."""
    from diffstudio.video.fastblend.patch_match import MatchConfig
    from diffstudio.video.fastblend.remapper import PatchMatchRemapper

    video = Scene(batch + 5, size)

    def frames(kind, first: int) -> torch.Tensor:
        stack = np.stack([getattr(video, kind)(t) for t in range(first, first + batch)])
        return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous().to(device)  # uint8, as the modes

    src_g, src_s = frames("guide", 0), frames("style", 0)
    tgt_g, tgt_s = frames("guide", 5), frames("style", 5)
    remapper = PatchMatchRemapper(MatchConfig(num_iter=num_iter), batch_size=batch)
    keys = [(0, i, i + 5) for i in range(batch)]
    runs = []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        remapper.pairs(src_g, src_s, tgt_g, tgt_s, keys)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:  # the first run warms up
            runs.append((time.perf_counter() - start) / batch)
    return statistics.median(runs)


def speed(args) -> None:
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    print(f"device {device}, {os.cpu_count()} CPU cores, load average {load:.1f} at start, "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for size in [int(s) for s in args.sizes.split(",")]:
            seconds = time_pairs(size, args.batch, args.repeats, device, args.num_iter)
            rows.append((threads, size, seconds))
            extra = ""
            if device.type == "cuda":
                extra = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB"
            print(f"threads {threads}  {size}x{size}  batch {args.batch}: {seconds:.3f} s/pair"
                  f"  (peak RSS so far {peak_rss_mb():.0f} MiB{extra})", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print("| threads | size | s / pair |\n|---|---|---|")
    for threads, size, seconds in rows:
        print(f"| {threads} | {size} | {seconds:.3f} |")


def memory_child(args) -> None:
    """One streamed blend, as the CLI runs it; prints peak RSS as JSON."""
    from diffstudio.video.fastblend import DiskFrames, iter_blend
    from diffstudio.video.video_io import VideoWriter

    torch.set_num_threads(args.threads_memory)
    baseline = peak_rss_mb()
    video = Scene(args.frames, args.size)
    with tempfile.TemporaryDirectory() as scratch:
        # Frames are made one at a time and spilled to disk, as the CLI spills decoded frames.
        guides = DiskFrames.spill((video.guide(t) for t in range(args.frames)), scratch)
        styles = DiskFrames.spill((video.style(t) for t in range(args.frames)), scratch)
        start = time.perf_counter()
        with VideoWriter(os.path.join(scratch, "out.mp4"), fps=30) as writer:
            for frame in iter_blend(styles, guides, mode=args.mode, window_size=args.window_size,
                                    batch_size=args.batch, num_iter=args.num_iter, device=args.device):
                writer.write(frame)
        seconds = time.perf_counter() - start
        guides.close()
        styles.close()
    print(json.dumps(dict(frames=args.frames, size=args.size, mode=args.mode, window_size=args.window_size,
                          batch_size=args.batch, num_iter=args.num_iter, seconds=round(seconds, 1),
                          rss_after_imports_mib=round(baseline), peak_rss_mib=round(peak_rss_mb()))))


def memory(args) -> None:
    """Runs ``memory_child`` in a fresh process, so that its peak RSS is the blend's alone."""
    command = [sys.executable, __file__, "--memory-child", "--frames", str(args.frames),
               "--size", str(args.size), "--mode", args.mode, "--window-size", str(args.window_size),
               "--batch", str(args.batch),
               "--num-iter", str(args.num_iter), "--device", args.device, "--threads-memory",
               str(args.threads_memory)]
    print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sizes", default="128,256,512", help="square frame sides to time")
    parser.add_argument("--threads", default="1,2", help="torch CPU threads to try, comma list")
    parser.add_argument("--batch", type=int, default=8, help="batch_size: pairs per remapper call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size (median)")
    parser.add_argument("--num-iter", type=int, default=5, help="iterations per pyramid level")
    parser.add_argument("--memory", action="store_true", help="measure the peak RSS of one streamed blend")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--window-size", type=int, default=15)
    parser.add_argument("--threads-memory", type=int, default=1, help="torch threads in the memory run")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
    elif args.memory:
        memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
