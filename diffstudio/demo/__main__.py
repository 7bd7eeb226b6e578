"""`python -m diffstudio.demo train|dataset` — the Shapes world's command line."""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m diffstudio.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the shapes-sd demo model from scratch")
    tr.add_argument("--out", default="diffstudio/demo/weights/shapes-sd.safetensors")
    tr.add_argument("--workdir", default="runs/shapes")
    tr.add_argument("--images", type=int, default=30000)
    tr.add_argument("--vae-steps", type=int, default=3000)
    tr.add_argument("--unet-steps", type=int, default=30000)
    tr.add_argument("--seed", type=int, default=0)
    ds = sub.add_parser("dataset", help="write a Shapes dataset folder (images + metadata.csv)")
    ds.add_argument("folder")
    ds.add_argument("-n", type=int, default=1000)
    ds.add_argument("--size", type=int, default=64)
    ds.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "train":
        from diffstudio.demo.build import build

        print(build(args.out, args.workdir, n_images=args.images, vae_steps=args.vae_steps,
                    unet_steps=args.unet_steps, seed=args.seed))
    else:
        from diffstudio.demo.shapes import write_dataset

        print(write_dataset(args.folder, args.n, args.size, args.seed))


if __name__ == "__main__":
    main()
