"""Peak memory of decoding an SVD video against its length: flat, since the temporal VAE decodes
``decode_chunk_size`` frames at a time and each chunk is written out before the next.

Each decode runs in a fresh process: the released SVD VAE's architecture (widths 128-512, random weights: memory
does not depend on the values) decodes T frames of latents through ``SVDPipeline``'s decoding into an .mp4, as a
stream. The parent reads each child's peak resident set size (``ru_maxrss``) and prints one row per length.

    OMP_NUM_THREADS=1 python benchmarks/svd_decode_memory.py --frames 25,128 --size 128 --chunk 8
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's diffstudio


def child(args) -> None:
    import types

    import torch

    from diffstudio.models.svd_vae import TemporalAutoencoderKL, TemporalVAEConfig
    from diffstudio.video.svd import SVDPipeline

    torch.set_num_threads(args.threads)
    vae = TemporalAutoencoderKL(TemporalVAEConfig(has_encoder=False, use_quant_conv=False)).eval()
    latents = torch.randn(1, args.n, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    pipe = SVDPipeline(types.SimpleNamespace(unet=None, vae=vae, image_encoder=None))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        pipe._decode(latents, args.chunk, os.path.join(folder, "out.mp4"), 7, "pil")
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"frames": args.n, "seconds": round(seconds, 1), "peak_mib": round(peak_mib)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="25,128")
    parser.add_argument("--size", type=int, default=128, help="square frame side in pixels")
    parser.add_argument("--chunk", type=int, default=8, help="decode_chunk_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n is not None:
        child(args)
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s); "
          f"{args.size}x{args.size}, decode_chunk_size {args.chunk}")
    rows = []
    for n in [int(f) for f in args.frames.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--n", str(n), "--size", str(args.size), "--chunk",
                              str(args.chunk), "--threads", str(args.threads)], check=True, capture_output=True,
                             text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{rows[-1]['frames']:>5} frames  peak RSS {rows[-1]['peak_mib']:>6} MiB  {rows[-1]['seconds']:>7} s")
    print(f"longest / shortest peak: {rows[-1]['peak_mib'] / rows[0]['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
