"""Peak memory of the CogVideoX VAE decode against the frame count: 13 vs 49 latent frames (49 vs 193 video
frames), the released 2B/5B layout with random weights, a small frame so it runs in about a minute on a CPU.

Each case runs in a fresh process (peak RSS is per process); prints the peak RSS, the size of the decoded
video and the time. `decode` holds the whole output; `stream` consumes the chunks as `decode_chunks` yields
them (frames written out as they come).

    python benchmarks/cogvideo_vae_memory.py --size 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_case(latent_frames: int, size: int, mode: str) -> dict:
    import torch

    from diffstudio.detect.cogvideo_vae import config_from_diffusers
    from diffstudio.models.cogvideo_vae import AutoencoderKLCogVideoX
    from diffstudio.release_configs import COGVIDEOX_2B_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(config_from_diffusers(COGVIDEOX_2B_VAE)).eval()
    latents = torch.randn(1, 16, latent_frames, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "decode":
            frames = vae.decode(latents).shape[2]
        else:
            frames = sum(piece.shape[2] for piece in vae.decode_chunks(latents))
    return {"latent_frames": latent_frames, "frames": frames, "mode": mode, "seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4, help="latent height and width (pixels / 8)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        frames, mode = args.case.split(":")
        print(json.dumps(run_case(int(frames), args.size, mode)))
        return
    for mode in ("decode", "stream"):
        for frames in (13, 49):
            out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--case", f"{frames}:{mode}"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{r['mode']:<7} {r['latent_frames']:3d} latent -> {r['frames']:3d} frames at "
                  f"{8 * args.size}x{8 * args.size}: peak RSS {r['peak_rss_mib']:7.0f} MiB, {r['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
