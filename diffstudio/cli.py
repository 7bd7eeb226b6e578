"""The `diffstudio` command line: info, generate, fastblend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffstudio.errors import DiffstudioError


def cmd_info(args) -> int:
    from diffstudio.loader import read_source

    path = Path(args.path)
    if path.is_file():
        from diffstudio.detect import detect
        from diffstudio.io.state_dict import read_file_metadata, read_state_dict_meta

        sd, _ = read_state_dict_meta(path)
        detection = detect(sd, read_file_metadata(path))
    else:
        detection, _ = read_source(path)
    print(f"{path}")
    print(detection.summary())
    from diffstudio.components import ARCHS

    for comp in detection.components.values():
        config = (comp.config.to_diff_dict() if hasattr(comp.config, "to_diff_dict")  # transformers: non-defaults
                  else ARCHS[comp.arch].config_to_dict(comp.config))
        config.pop("transformers_version", None)
        shown = {k: v for k, v in config.items() if not isinstance(v, dict) and v not in (None, [], {})}
        print(f"  {comp.role} config: {shown}")
    return 0


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def cmd_generate(args) -> int:
    import diffstudio
    from diffstudio.io.recipe import save_png

    regions = None
    if args.regions:  # checked before the model loads: a typo in the layout fails fast
        from diffstudio.pipeline.region_layout import load_layout

        regions = load_layout(args.regions)
    paths = [args.model] if args.model else []
    if args.vae:
        paths.append(args.vae)
    models = diffstudio.load(*paths, dtype=_dtype(args.dtype), device=args.device)
    for spec in args.lora or ():
        file, strength = _lora_spec(spec)
        models.apply_lora(file, strength)
    pipe = diffstudio.Pipeline(models)
    sigmas = [float(s) for s in args.sigmas.split(",")] if args.sigmas else None
    images = pipe(args.prompt, args.negative, width=args.width, height=args.height, steps=args.steps,
                  cfg_scale=args.cfg, seed=args.seed, sampler=args.sampler, scheduler=args.scheduler,
                  sigmas=sigmas, batch_size=args.batch_size, init_image=args.init_image,
                  strength=args.strength, mask=args.mask, clip_skip=args.clip_skip,
                  tiled_vae=True if args.tiled_vae else None, regions=regions, region_mode=args.region_mode)
    out = Path(args.output)
    for i, image in enumerate(images):
        target = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_png(image, target, image.info["diffstudio_recipe"])
        print(f"wrote {target}")
    return 0


def cmd_train_lora(args) -> int:
    from diffstudio.train.lora import LoRATrainConfig, train_lora

    config = LoRATrainConfig(data=args.data, out=args.out, model=args.model, rank=args.rank, alpha=args.alpha,
                             targets=args.targets, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup=args.warmup, lr_end=args.lr_end, snr_gamma=args.snr_gamma,
                             resolution=args.resolution,
                             buckets=not args.no_buckets,
                             precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
                             optimizer=args.optimizer, caption_dropout=args.caption_dropout, seed=args.seed,
                             checkpoint_every=args.checkpoint_every, workdir=args.workdir,
                             export_format=args.format, restart=args.restart)
    print(f"wrote {train_lora(config)}")
    return 0


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a LoRA (any family) or AnimateDiff motion modules")
    kinds = train.add_subparsers(dest="kind", required=True)
    lora = kinds.add_parser("lora", help="train a LoRA on a folder of images with captions",
                            description="Runs on accelerate: `accelerate launch -m diffstudio.cli train lora ...` "
                                        "uses the GPUs/nodes of your accelerate config (docs/training.md).")
    lora.add_argument("--model", help="base model file or folder (default: the packaged Shapes demo model)")
    lora.add_argument("--data", required=True, help="images + metadata.csv (file_name,text) or .txt captions")
    lora.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, help="default: the rank")
    lora.add_argument("--targets", help="regex over denoiser layer names (default: the family's)")
    lora.add_argument("--steps", type=int, default=1000)
    lora.add_argument("--batch-size", type=int, default=1)
    lora.add_argument("--lr", type=float, default=1e-4)
    lora.add_argument("--warmup", type=int, default=0)
    lora.add_argument("--lr-end", type=float, default=None, help="anneal to this learning rate (half cosine)")
    lora.add_argument("--snr-gamma", type=float, default=None,
                      help="Min-SNR-gamma loss weighting, e.g. 5 (eps/v families; docs/training.md)")
    lora.add_argument("--resolution", type=int, help="bucket area = resolution^2 (default: the model's size)")
    lora.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    lora.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    lora.add_argument("--gradient-checkpointing", action="store_true")
    lora.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused", "adamw8bit"])
    lora.add_argument("--caption-dropout", type=float, default=0.0)
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--checkpoint-every", type=int, default=100)
    lora.add_argument("--workdir", help="checkpoints + caches (default: OUT.run); a rerun with the same data, "
                                        "base model and settings resumes from it")
    lora.add_argument("--restart", action="store_true",
                      help="discard the work folder's checkpoint (a run with other data or settings) and start over")
    lora.add_argument("--format", default="kohya", choices=["kohya", "peft"])
    lora.set_defaults(func=cmd_train_lora)

    from diffstudio.video import train_cli

    train_cli.add_parser(kinds)


def _lora_spec(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH`` (the last ``:`` splits only when a number follows it)."""
    file, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return file, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def cmd_lora_inspect(args) -> int:
    from diffstudio.patches import inspect_lora

    models = None
    if args.model:
        import diffstudio

        models = diffstudio.load(args.model)
    report = inspect_lora(args.file, models)
    print(report.text())
    if models is not None:
        from diffstudio.patches.doctor import check_coverage

        check_coverage(report)  # none matched: a named error (exit 2); some: a warning with the numbers
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstudio", description="A unified diffusion engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="say what a model file or folder is (or why it is not recognised)")
    info.add_argument("path")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model file or diffusers folder (default: the packaged Shapes demo model)")
    gen.add_argument("--vae", help="a separate VAE file to use instead of the bundled one")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--negative", default="")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--sampler")
    gen.add_argument("--scheduler")
    gen.add_argument("--sigmas", help="custom comma-separated sigmas, ending in 0")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--init-image")
    gen.add_argument("--strength", type=float, help="img2img: how much to repaint (default 0.75)")
    gen.add_argument("--mask", help="white = repaint (needs --init-image)")
    gen.add_argument("--clip-skip", type=int)
    gen.add_argument("--tiled-vae", action="store_true", help="encode/decode in tiles (large images)")
    gen.add_argument("--regions", help="a region layout JSON file: a prompt per area (docs/regions.md)")
    gen.add_argument("--region-mode", default="latent", choices=["latent", "attention"],
                     help="latent: a pass per region, blended (any model); attention: one pass, masked attention")
    gen.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                     help="apply a LoRA / LyCORIS file before generating (repeatable), e.g. style.safetensors:0.8")
    gen.add_argument("--dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"])
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=cmd_generate)

    lora = sub.add_parser("lora", help="LoRA tools").add_subparsers(dest="lora_command", required=True)
    lora_inspect = lora.add_parser("inspect", help="the LoRA doctor: format, target family, coverage on a model")
    lora_inspect.add_argument("file")
    lora_inspect.add_argument("--model", help="a base model: report how much of the LoRA matches it")
    lora_inspect.set_defaults(func=cmd_lora_inspect)
    _add_train_parser(sub)

    try:
        from diffstudio.video.fastblend import cli as fastblend_cli

        fastblend_cli.add_parser(sub)
    except ImportError:  # the video extra is optional
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiffstudioError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
