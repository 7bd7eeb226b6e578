"""VAE decode speed: diffstudio's AutoencoderKL vs diffusers', same random weights, one process.

SD 1.5-size VAE (block_out_channels 128/256/512/512, 2 blocks per level, 4 latent channels);
decodes a (1, 4, S, S) latent into an (8S x 8S) image. Runs are interleaved (ours, theirs, ours,
...) so load from other processes hits both alike; prints medians and ratios, plus the relative
error of every variant against diffusers fp32.

    python benchmarks/vae_decode.py --size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffstudio.convert.vae import vae_from_diffusers
from diffstudio.detect.vae import config_from_diffusers
from diffstudio.models.vae import AutoencoderKL

SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def build_pair(dtype_variants: list[str]) -> dict[str, callable]:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    theirs = DiffusersAutoencoderKL(**SD15_VAE).eval()  # diffusers' default (random) init
    config = config_from_diffusers(theirs.config)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(vae_from_diffusers(theirs.state_dict()))
    runners = {"diffusers fp32": lambda z: theirs.decode(z).sample, "ours fp32": ours.decode}
    if "winograd" in dtype_variants:  # fp32, the 3x3 convolutions by Winograd F(4x4, 3x3) (Models.winograd)
        from diffstudio.models.winograd import use_winograd

        model = AutoencoderKL(config).eval()
        model.load_state_dict(ours.state_dict())
        use_winograd(model)
        runners["ours fp32 winograd"] = model.decode
    for variant in dtype_variants:
        if not variant.startswith("bf16"):
            continue
        # "bf16": everything in bf16; "bf16:N": only the N highest-resolution levels (see set_precision)
        levels = int(variant.split(":")[1]) if ":" in variant else None
        model = AutoencoderKL(config).eval()
        model.load_state_dict(ours.state_dict())
        runners[f"ours {variant}"] = model.set_precision(torch.bfloat16, levels).decode
    if "diffusers-bf16" in dtype_variants:
        theirs_bf16 = DiffusersAutoencoderKL(**SD15_VAE).eval()
        theirs_bf16.load_state_dict(theirs.state_dict())
        theirs_bf16.to(torch.bfloat16)
        runners["diffusers bf16"] = lambda z: theirs_bf16.decode(z.to(torch.bfloat16)).sample
    return runners


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent side (64 -> 512x512 image)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--variants", default="bf16",
                        help="extra variants, comma-separated: bf16 (all levels), bf16:N (the N "
                             "highest-resolution levels in bf16, the rest fp32), diffusers-bf16, winograd (ours fp32 "
                             "with Winograd convolutions)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runners = build_pair(args.variants.split(","))
    z = torch.randn(1, 4, args.size, args.size, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, run in runners.items():  # warm-up (oneDNN primitive creation) + reference outputs
            outputs[name] = run(z).float()
        for _ in range(args.repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run(z)
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["diffusers fp32"])
    print(f"VAE decode {args.size}x{args.size} latent -> {8 * args.size}px image, "
          f"{torch.get_num_threads()} threads, {args.repeats} runs each")
    print(f"{'variant':16s} {'median s':>9s} {'vs diffusers fp32':>18s} {'rel err vs diffusers fp32':>26s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        err = rel_err(outputs[name], outputs["diffusers fp32"])
        print(f"{name:16s} {med:9.2f} {med / base:17.2f}x {err:26.2e}   runs: "
              + " ".join(f"{t:.2f}" for t in ts))


if __name__ == "__main__":
    main()
