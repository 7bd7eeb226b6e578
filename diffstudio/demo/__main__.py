"""`python -m diffstudio.demo train|dataset|evaluate|motion|ip-adapter` — the Shapes world's command line."""

from __future__ import annotations

import argparse

from diffstudio.threads import prepare_threads


def _rate_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main() -> None:
    prepare_threads()  # before torch is imported (diffstudio/threads.py)
    import inspect

    from diffstudio.demo.build import STAGES, build

    recipe = {name: p.default for name, p in inspect.signature(build).parameters.items()}  # one source of defaults

    parser = argparse.ArgumentParser(prog="python -m diffstudio.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the shapes-sd demo model from scratch")
    tr.add_argument("--out", default="diffstudio/demo/weights/shapes-sd.safetensors")
    tr.add_argument("--workdir", default=recipe["workdir"])
    tr.add_argument("--images", type=int, default=recipe["n_images"])
    tr.add_argument("--vae-steps", type=int, default=recipe["vae_steps"])
    tr.add_argument("--decoder-steps", type=int, default=recipe["decoder_steps"],
                    help="decoder fine-tune steps; 0 skips it (the file keeps the VAE stage's decoder)")
    tr.add_argument("--unet-steps", type=int, default=recipe["unet_steps"])
    tr.add_argument("--unet-lr-end", type=_rate_or_none, default=recipe["unet_lr_end"],
                    help="anneal the unet stage's rate (half cosine) from 1e-3 down to this; 'none': constant")
    tr.add_argument("--optimizer", default=recipe["optimizer"], choices=["adamw", "adamw_fused"],
                    help="adamw_fused is 4x faster on the optimizer step; adamw rounds otherwise in the last bit")
    tr.add_argument("--vae-edge-weight", type=float, default=recipe["vae_edge_weight"],
                    help="count the pixels along the images' edges (1 + this) times in the VAE and decoder stages")
    tr.add_argument("--layout-steps", type=int, default=recipe["layout_steps"])
    tr.add_argument("--polish-steps", type=int, default=recipe["polish_steps"])
    tr.add_argument("--refine-steps", type=int, default=recipe["refine_steps"])
    tr.add_argument("--stage", action="append", choices=list(STAGES),
                    help="run only these stages (repeatable); default: all, in order")
    tr.add_argument("--seed", type=int, default=recipe["seed"])
    ds = sub.add_parser("dataset", help="write a Shapes dataset folder (images + metadata.csv)")
    ds.add_argument("folder")
    ds.add_argument("-n", type=int, default=1000)
    ds.add_argument("--size", type=int, default=64)
    ds.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("evaluate", help="score the demo model on single-shape prompts")
    ev.add_argument("--model", help="model path (default: the packaged demo model)")
    ev.add_argument("--pairs", type=int, default=120)
    ev.add_argument("--steps", type=int)
    ev.add_argument("--sampler")
    ev.add_argument("--cfg", type=float, help="guidance scale (default: the model's own, 3 for the demo model)")
    ev.add_argument("--seed", type=int, default=1000, help="the first pair's image seed (one more per pair)")
    from diffstudio.demo.motion_build import add_motion_parser

    add_motion_parser(sub)
    from diffstudio.demo import ip_adapter_build

    ip_adapter_build.add_parser(sub)
    args = parser.parse_args()
    if args.command == "ip-adapter":
        ip_adapter_build.run_command(args)
    elif args.command == "motion":
        from diffstudio.demo.motion_build import run_motion_command

        run_motion_command(args)
    elif args.command == "train":
        print(build(args.out, args.workdir, n_images=args.images, vae_steps=args.vae_steps,
                    decoder_steps=args.decoder_steps, unet_steps=args.unet_steps,
                    layout_steps=args.layout_steps, polish_steps=args.polish_steps,
                    refine_steps=args.refine_steps, unet_lr_end=args.unet_lr_end, optimizer=args.optimizer,
                    vae_edge_weight=args.vae_edge_weight, seed=args.seed,
                    stages=tuple(args.stage or STAGES)))
    elif args.command == "evaluate":
        import json

        import diffstudio
        from diffstudio.demo.evaluate import evaluate

        models = diffstudio.load(args.model) if args.model else diffstudio.load()  # the packaged demo model
        if args.cfg is not None:
            models.defaults = {**models.defaults, "cfg_scale": args.cfg}
        print(json.dumps(evaluate(models, args.pairs, args.steps, args.sampler, seed=args.seed), indent=1))
    else:
        from diffstudio.demo.shapes import write_dataset

        print(write_dataset(args.folder, args.n, args.size, args.seed))


if __name__ == "__main__":
    main()
