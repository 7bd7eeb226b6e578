"""The `diffstudio` command line: info, generate, lora inspect, train lora, fastblend.

Building the parser imports no torch (``diffstudio --help`` answers at once, and the OpenMP wait
policy of diffstudio/threads.py is set before torch starts); each command imports what it needs.
Every error a user can cause ends the run with one line on stderr and exit status 2:
``error: <ErrorName>: <message>`` for diffstudio's named errors, ``error: <message>`` for a command
line argparse refuses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffstudio.errors import DiffstudioError, InvalidInputError, LoRANotFoundError, UnknownModelError
from diffstudio.sampling_names import SAMPLER_NAMES, SCHEDULER_NAMES
from diffstudio.threads import prepare_threads, set_threads
from diffstudio.video.cli import add_video_parser
from diffstudio.video.diffutoon_cli import add_diffutoon_parser

LORA_DIRS_ENV = "DIFFSTUDIO_LORA_DIRS"  # folders searched for <lora:name:w> prompt tags, os.pathsep-separated


class UsageError(Exception):
    """A command line argparse refuses (unknown option, bad value, missing argument)."""


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def cmd_info(args) -> int:
    from diffstudio.loader import read_source

    path = Path(args.path)
    try:
        if path.is_file():
            from diffstudio.detect import detect
            from diffstudio.io.state_dict import read_file_metadata, read_state_dict_meta

            sd, _ = read_state_dict_meta(path)
            detection = detect(sd, read_file_metadata(path))
        else:
            detection, _ = read_source(path)
    except UnknownModelError:
        lora = _lora_summary(path) if path.is_file() else None
        if lora is None:
            raise
        print(f"{path}: {lora}; `diffstudio lora inspect {path}` tells more")
        return 0
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


def _lora_summary(path: Path) -> str | None:
    """'a LoRA file (format, N layers, made for F), not a model' when ``path`` is one, else None."""
    from diffstudio.patches.doctor import lora_report_if_lora

    try:
        report = lora_report_if_lora(path)
    except DiffstudioError:
        return None
    if report is None:
        return None
    return (f"a LoRA file ({report.format}, {report.layers} layers, made for {report.family_guess or 'unknown'}), "
            "not a model")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def check_device(name: str) -> None:
    """A device torch knows and this machine has, or a named error (before any model is loaded)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(f"--device {name}: not a device name; use cpu, cuda, cuda:N, mps or xpu") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidInputError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise InvalidInputError(f"--device {name}: no {device.type} device is available here; use --device cpu")


def _lora_dirs(args) -> list[Path]:
    """--lora-dir folders, then those of DIFFSTUDIO_LORA_DIRS; each must exist."""
    given = [(folder, "--lora-dir") for folder in args.lora_dir or ()]
    given += [(folder, LORA_DIRS_ENV) for folder in os.environ.get(LORA_DIRS_ENV, "").split(os.pathsep) if folder]
    folders = []
    for folder, source in given:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise InvalidInputError(f"LoRA folder not found: {folder} (from {source})")
        folders.append(path)
    return folders


def _check_inputs(args) -> None:
    """Every file the command line names exists (a named error for the kind of file), before anything loads."""
    from diffstudio.io.folders import existing_path

    named = [(args.model, "model"), (args.vae, "VAE file"), (args.init_image, "init image"),
             (args.mask, "mask image")]
    named += [(lora_spec(spec)[0], "LoRA file") for spec in args.lora or ()]
    for unit in _control_specs(args):
        named += [(unit["model"], "ControlNet file"), (unit["image"], "control image")]
    named += [(args.ip_adapter, "IP-Adapter file"), (args.ip_encoder, "IP-Adapter image encoder")]
    named += [(lora_spec(spec)[0], "reference image") for spec in args.ip_image or ()]
    if args.ip_image and not args.ip_adapter:
        raise UsageError("--ip-image needs --ip-adapter FILE (the adapter that reads the reference image)")
    for path, kind in named:
        if path:
            existing_path(path, kind)


def add_winograd_option(parser) -> None:
    """``--winograd [wide]`` (generate, video, img2vid): ``Models.winograd`` after loading."""
    parser.add_argument("--winograd", nargs="?", const="on", choices=["on", "wide"],
                        help="fp32 on the CPU: the large 3x3 convolutions by Winograd's F(4x4, 3x3) (faster; "
                             "relative error about 3e-6 a convolution; about 1.2 GB more memory at SD sizes); 'wide' "
                             "also the widest layers (faster still, 8.3 GB more for SD 1.5; docs/benchmarks.md)")


def apply_winograd_option(models, args) -> None:
    if getattr(args, "winograd", None):
        models.winograd(wide=args.winograd == "wide")


def _control_specs(args) -> list[dict]:
    """``--control [PREPROCESS:]FILE:IMAGE[:SCALE]`` -> ControlNetUnit arguments (PREPROCESS: an annotator of
    pipeline.control.PREPROCESSORS, or none when the image is already a control image)."""
    units = []
    for spec in getattr(args, "control", None) or ():
        parts = spec.split(":")
        scale = 1.0
        if len(parts) >= 3:
            try:
                scale = float(parts[-1])
                parts = parts[:-1]
            except ValueError:
                pass
        preprocess = parts.pop(0) if len(parts) == 3 else None
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"--control {spec!r}: expected [PREPROCESS:]FILE:IMAGE[:SCALE], e.g. "
                             "canny:control_v11p_sd15_canny.pth:photo.png:0.8")
        units.append({"model": parts[0], "image": parts[1], "scale": scale,
                      "preprocess": None if preprocess in (None, "none") else preprocess})
    return units


def _union_mode(models, unit: dict) -> dict:
    """A ``--control`` unit for a union ControlNet (one that takes modes) takes its PREPROCESS word as the mode too.
    The word runs its annotator only when that annotator reads no weight files (``canny:union.safetensors:photo.png``
    finds edges and uses mode canny); ``depth:``, ``openpose:``, ``hed:`` ... name a mode and the image is used as it
    is: a union's control image is usually made beforehand (``diffstudio annotate --kind depth``)."""
    from diffstudio.control.names import WEIGHT_FREE

    if unit["preprocess"] and getattr(models.add_controlnet(unit["model"]), "is_union", False):
        unit = {**unit, "mode": unit["preprocess"]}
        if unit["preprocess"] not in WEIGHT_FREE:
            unit["preprocess"] = None
    return unit


def cmd_plan(args) -> int:
    import torch

    from diffstudio.memory.planner import parse_size, plan

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = parse_size(args.device_memory) if args.device_memory else None
    host = parse_size(args.host_memory) if args.host_memory else None
    chosen = plan(args.model, args.width, args.height, device_free=device, host_free=host, batch=args.batch_size,
                  dtype=dtype)
    print(chosen.explain())
    kwargs = chosen.load_kwargs()
    print("  load with: diffstudio.load(..., " + ", ".join(
        f"{k}={v!r}" if not isinstance(v, torch.dtype) else f"{k}=torch.{str(v).removeprefix('torch.')}"
        for k, v in kwargs.items()) + "); Pipeline(...)(..., tiled_vae=" + str(chosen.tiled_vae) + ")")
    flags = [f"--dtype {args.dtype}"] + [f"--{k} {kwargs[k]}" for k in ("offload", "storage") if kwargs[k]]
    print("  or: diffstudio generate ... " + " ".join(flags) + (" --tiled-vae" if chosen.tiled_vae else ""))
    return 0


def cmd_generate(args) -> int:
    from diffstudio.io.recipe import image_format, save_image

    image_format(args.output)  # a suffix we cannot write fails now, not after the images are made
    regions = None
    if args.regions:  # checked before the model loads: a typo in the layout fails fast
        from diffstudio.pipeline.region_layout import load_layout

        regions = load_layout(args.regions)
    _check_inputs(args)
    lora_dirs = _lora_dirs(args)
    check_device(args.device)
    import diffstudio

    paths = [args.model] if args.model else []
    if args.vae:
        paths.append(args.vae)
    try:
        models = diffstudio.load(*paths, dtype=torch_dtype(args.dtype), device=args.device, offload=args.offload,
                                 storage=args.storage)
    except UnknownModelError:
        for path in paths:
            lora = _lora_summary(Path(path))
            if lora is not None:
                raise InvalidInputError(f"{path} is {lora}: pass it with --lora {path}") from None
        raise
    for spec in args.lora or ():
        file, strength = lora_spec(spec)
        models.apply_lora(file, strength)
    apply_winograd_option(models, args)
    if args.compile:
        models.compile(freeze=args.compile == "freeze")
    pipe = diffstudio.Pipeline(models)
    pipe.lora_dirs = lora_dirs
    options = {"width": args.width, "height": args.height, "steps": args.steps, "cfg_scale": args.cfg,
               "sampler": args.sampler, "scheduler": args.scheduler, "sigmas": args.sigmas,
               "init_image": args.init_image, "strength": args.strength, "mask": args.mask,
               "clip_skip": args.clip_skip, "tiled_vae": True if args.tiled_vae else None,
               "guidance": args.guidance, "regions": regions,
               "region_mode": args.region_mode if regions is not None else None,
               "deep_cache": args.deep_cache, "cfg_until": args.cfg_until,
               "token_merging": args.tome}
    modules = []
    if args.tile_size:
        from diffstudio.pipeline.tiled_diffusion import TiledDiffusion

        overlap = args.tile_size // 4 if args.tile_overlap is None else args.tile_overlap
        modules.append(TiledDiffusion(tile=args.tile_size, overlap=overlap))
    if args.ip_image:
        from diffstudio.pipeline.ip_adapter import ImagePrompt

        adapter = models.add_ip_adapter(args.ip_adapter, args.ip_encoder)
        options["ip_adapter"] = [ImagePrompt(image, scale=scale, model=adapter, style_only=args.ip_style_only)
                                 for image, scale in (lora_spec(spec, 0.7) for spec in args.ip_image)]
    if args.control:
        from diffstudio.pipeline.control import ControlNetUnit

        options["controlnets"] = [ControlNetUnit(**_union_mode(models, unit)) for unit in _control_specs(args)]
    try:
        images = pipe(args.prompt, args.negative, seed=args.seed, batch_size=args.batch_size, modules=modules,
                      **{name: value for name, value in options.items() if value is not None})
    except LoRANotFoundError as err:
        raise LoRANotFoundError(f"{err}; on the command line: --lora-dir DIR (repeatable) or {LORA_DIRS_ENV}") \
            from None
    out = Path(args.output)
    for i, image in enumerate(images):
        target = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_image(image, target, image.info["diffstudio_recipe"])
        print(f"wrote {target}")
    return 0


def cmd_batch(args) -> int:
    from diffstudio.batch import run_batch

    check_device(args.device)
    written = run_batch(args.recipes, args.output, model=args.model, restart=args.restart,
                        dtype=torch_dtype(args.dtype) if args.dtype else None, device=args.device)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0


def _add_batch_parser(sub) -> None:
    batch = sub.add_parser("batch", help="render a file of recipes (JSON lines), resumable, across processes",
                           description="Render every line of a JSON-lines recipe file into a folder; done lines are "
                                       "skipped, so a stopped batch continues; under `accelerate launch` the lines "
                                       "are shared among the processes (docs/scale.md).")
    batch.add_argument("recipes", help="a .jsonl file: one Request object per line (docs/scale.md)")
    batch.add_argument("-o", "--output", required=True, help="the output folder")
    batch.add_argument("--model", help="the checkpoint for lines without a \"model\" (default: the demo model)")
    batch.add_argument("--restart", action="store_true", help="render over outputs left by other recipes")
    batch.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    batch.add_argument("--device", default="cpu")
    batch.set_defaults(func=cmd_batch)


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
                             export_format=args.format, restart=args.restart, frames=args.frames,
                             width=args.width, height=args.height, shard=args.shard)
    print(f"wrote {train_lora(config)}")
    return 0


def _add_train_parser(sub) -> None:
    from diffstudio.train.options import add_run_options

    train = sub.add_parser("train", help="train a LoRA (any family), AnimateDiff motion modules, an ExVideo "
                                        "extension, ...")
    kinds = train.add_subparsers(dest="kind", required=True)
    lora = kinds.add_parser("lora", help="train a LoRA on a folder of images (CogVideoX: clips) with captions",
                            description="Runs on accelerate: `accelerate launch -m diffstudio.cli train lora ...` "
                                        "uses the GPUs/nodes of your accelerate config (docs/training.md).")
    lora.add_argument("--model", help="base model file or folder (default: the packaged Shapes demo model)")
    lora.add_argument("--data", required=True, help="images + metadata.csv (file_name,text) or .txt captions; "
                                                    "CogVideoX: video files or folders of frames (docs/cogvideox.md)")
    lora.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, help="default: the rank")
    lora.add_argument("--targets", help="regex over denoiser layer names (default: the family's)")
    lora.add_argument("--resolution", type=int, help="bucket area = resolution^2 (default: the model's size)")
    lora.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    lora.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    lora.add_argument("--gradient-checkpointing", action="store_true")
    lora.add_argument("--format", choices=["kohya", "peft"], help="default: kohya (CogVideoX: peft)")
    lora.add_argument("--frames", type=int, help="CogVideoX: frames per clip, 4k + 1 (default 49)")
    lora.add_argument("--width", type=int, help="CogVideoX: clip width (default the model's, 720)")
    lora.add_argument("--height", type=int, help="CogVideoX: clip height (default the model's, 480)")
    add_run_options(lora, steps=1000, batch_size=1, lr=1e-4, shard=True)
    lora.set_defaults(func=cmd_train_lora)
    from diffstudio.control import cli as control_cli

    control_cli.add_train_parser(kinds)

    from diffstudio.video import train_cli

    train_cli.add_parser(kinds)
    from diffstudio.train import ip_adapter_cli

    ip_adapter_cli.add_parser(kinds)
    from diffstudio.train import exvideo_cli

    exvideo_cli.add_parser(kinds)


def lora_spec(spec: str, default: float = 1.0) -> tuple[str, float]:
    """``FILE`` or ``FILE:STRENGTH`` (the last ``:`` splits only when a number follows it)."""
    file, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return file, float(tail)
        except ValueError:
            pass
    return spec, default


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


# -- the parser (torch-free) ---------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to an option's help where X says something (not None, '', False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or quiet or action.default == "":
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Errors as one line (UsageError, printed by main); defaults shown in help; arguments added on first
    use where ``configure_later`` is set (a command whose module imports torch)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.configure_later = None

    def _configure(self) -> None:
        if self.configure_later is not None:
            configure, self.configure_later = self.configure_later, None
            configure(self)

    def parse_known_args(self, args=None, namespace=None):
        self._configure()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._configure()
        return super().format_help()

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def _sigmas(text: str) -> list[float]:
    """'14.6,7,3.1,0' -> floats (whether they make a schedule is the pipeline's check)."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not a number; give comma-separated "
                                             "numbers ending in 0, e.g. 14.6,7.0,3.1,0") from None
    return values


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate images from a prompt",
                         description="Generate images; options not given take the model's own defaults.")
    gen.add_argument("prompt", help="what to draw (the A1111 prompt language: (word:1.3), [word], BREAK, "
                                    "<lora:name:w>; docs/prompts.md)")
    gen.add_argument("--model", help="model file or diffusers folder (default: the packaged Shapes demo model)")
    gen.add_argument("--vae", help="a separate VAE file to use instead of the bundled one")
    gen.add_argument("-o", "--output", default="out.png",
                     help="the image to write; its suffix chooses the format: .png .jpg .jpeg .webp "
                          "(a batch writes NAME-0, NAME-1 ...)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    gen.add_argument("--guidance", type=float,
                     help="FLUX dev's distilled guidance, an input of the model (default: the model's)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed; image i of a batch uses seed + i")
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME",
                     help=f"one of: {', '.join(SAMPLER_NAMES)} (default: the model's)")
    gen.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME",
                     help=f"sigma schedule, one of: {', '.join(SCHEDULER_NAMES)} (default: the model's)")
    gen.add_argument("--sigmas", type=_sigmas, metavar="S1,S2,...,0",
                     help="custom comma-separated sigmas, decreasing and ending in 0 (replace --steps/--scheduler)")
    gen.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument("--batch-size", type=int, default=1, help="images made at once")
    gen.add_argument("--init-image", metavar="FILE", help="img2img: start from this image")
    gen.add_argument("--strength", type=float,
                     help="img2img / inpainting: how much of the init image is redrawn, 0-1 (default: the "
                          "pipeline's)")
    gen.add_argument("--mask", metavar="FILE", help="inpainting: white = repaint (needs --init-image)")
    gen.add_argument("--clip-skip", type=int,
                     help="use the text encoder's N-th layer from the end (default: the model's)")
    gen.add_argument("--tiled-vae", action="store_true", help="encode/decode in tiles (large images)")
    gen.add_argument("--tile-size", type=_positive_int, metavar="PIXELS",
                     help="tiled diffusion: denoise in overlapping tiles of this size (docs/large-images.md)")
    gen.add_argument("--tile-overlap", type=int, metavar="PIXELS",
                     help="tiled diffusion: pixels neighbouring tiles share (default: a quarter of the tile)")
    gen.add_argument("--ip-adapter", metavar="FILE", help="an IP-Adapter file for --ip-image (docs/ipadapter.md)")
    gen.add_argument("--ip-encoder", metavar="PATH",
                     help="its CLIP image encoder, a folder or file (default: image_encoder/ beside the adapter)")
    gen.add_argument("--ip-image", action="append", metavar="IMAGE[:SCALE]",
                     help="a reference image for the IP-Adapter (repeatable), e.g. ink.png:0.7")
    gen.add_argument("--ip-style-only", action="store_true",
                     help="the reference image steers the style blocks only (InstantStyle)")
    gen.add_argument("--control", action="append", metavar="[PRE:]FILE:IMAGE[:SCALE]",
                     help="a ControlNet unit (repeatable), e.g. canny:control_v11p_sd15_canny.pth:photo.png:0.8; "
                          "PRE is an annotator run on IMAGE first: canny, lineart, softedge, tile, blur, or the "
                          "learned hed, lineart_realistic, lineart_coarse (weights from $DIFFSTUDIO_ANNOTATORS; "
                          "docs/controlnet.md); for a "
                          "union ControlNet it is also the mode (depth:union.safetensors:depth.png)")
    gen.add_argument("--regions", metavar="FILE", help="a region layout JSON file: a prompt per area "
                                                       "(docs/regions.md)")
    gen.add_argument("--region-mode", default="latent", choices=["latent", "attention"],
                     help="latent: a pass per region, blended (any model); attention: one pass, masked attention")
    gen.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                     help="apply a LoRA / LyCORIS file before generating (repeatable), e.g. style.safetensors:0.8")
    gen.add_argument("--lora-dir", action="append", metavar="DIR",
                     help=f"a folder where <lora:name:w> prompt tags are looked up (repeatable; also "
                          f"{LORA_DIRS_ENV}, folders separated by '{os.pathsep}', searched after these)")
    gen.add_argument("--deep-cache", type=_positive_int, metavar="K",
                     help="DeepCache: reuse a UNet's deep features for K calls after each full one (faster, "
                          "a quality trade; docs/benchmarks.md)")
    gen.add_argument("--cfg-until", type=float, metavar="FRACTION",
                     help="guidance on the first FRACTION of the steps only, then the prompt alone (faster, a "
                          "quality trade; docs/benchmarks.md)")
    gen.add_argument("--tome", type=float, metavar="RATIO",
                     help="token merging: the self-attention of a UNet's high-resolution transformers on 1 - RATIO "
                          "of the tokens (e.g. 0.5; faster at large sizes, a quality trade; docs/benchmarks.md)")
    add_winograd_option(gen)
    gen.add_argument("--compile", nargs="?", const="on", choices=["on", "freeze"],
                     help="torch.compile the denoiser (inductor; the first step compiles, minutes at full size; "
                          "'freeze' folds the weights in as constants; docs/benchmarks.md)")
    gen.add_argument("--dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"],
                     help="weights' precision")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    gen.add_argument("--offload", choices=["model", "group", "sequential"],
                     help="keep the weights on the host and move them to --device for their calls: whole components "
                          "(model), blocks streamed one ahead (group) or moved one at a time (sequential); "
                          "`diffstudio plan` says which one fits (docs/memory.md)")
    gen.add_argument("--storage", choices=["fp8"], help="store the denoiser's Linear weights in float8 (FLUX, SD3, "
                                                        "CogVideoX)")
    gen.set_defaults(func=cmd_generate)


def _configure_fastblend(parser: argparse.ArgumentParser) -> None:
    """Adds fastblend's arguments (its module imports torch: only when the command is used)."""
    try:
        from diffstudio.video.fastblend import cli as fastblend_cli
    except ImportError as err:
        raise UsageError(f"fastblend needs the video extra ({err}): pip install 'diffstudio[video]'") from None
    fastblend_cli.configure(parser)
    _add_threads_option(parser, argparse.SUPPRESS)  # `--threads` after the command; SUPPRESS keeps a global one
    parser.description = fastblend_cli.__doc__.split("\n\n")[0]
    parser.set_defaults(func=fastblend_cli.run)


def _add_threads_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--threads", type=_positive_int, default=default, metavar="N",
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the physical cores; "
                             "idle threads wait passively, so sharing the cores with other work costs little: "
                             "docs/benchmarks.md)")


def _accept_threads_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--threads` after the command name too; SUPPRESS keeps a global --threads from being overwritten."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child.configure_later is None and "--threads" not in child._option_string_actions:
                    _add_threads_option(child, argparse.SUPPRESS)
                _accept_threads_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffstudio", description="A unified diffusion engine.")
    _add_threads_option(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="say what a model file or folder is (or why it is not recognised)")
    info.add_argument("path")
    info.set_defaults(func=cmd_info)

    plan = sub.add_parser("plan", help="say how a model fits this machine's memory (dtype, fp8, offload, VAE tiling)",
                          description="Choose, from the model files' headers alone, the compute dtype, fp8 storage "
                          "of the denoiser, offload and VAE tiling that fit the device's and the host's free memory, "
                          "and say why (docs/memory.md). Nothing is loaded.")
    plan.add_argument("model", nargs="+", help="the model's files or folder, as `generate --model` takes them")
    plan.add_argument("--width", type=int, default=1024)
    plan.add_argument("--height", type=int, default=1024)
    plan.add_argument("--batch-size", type=int, default=1)
    plan.add_argument("--device-memory", help="the device's free memory, e.g. 8GiB (default: the free memory of "
                      "the CUDA device; without one the device is the host)")
    plan.add_argument("--host-memory", help="the host's free memory, e.g. 24GiB (default: MemAvailable)")
    plan.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    plan.set_defaults(func=cmd_plan)

    _add_generate_parser(sub)
    _add_batch_parser(sub)

    lora = sub.add_parser("lora", help="LoRA tools").add_subparsers(dest="lora_command", required=True)
    lora_inspect = lora.add_parser("inspect", help="the LoRA doctor: format, target family, coverage on a model")
    lora_inspect.add_argument("file")
    lora_inspect.add_argument("--model", help="a base model: report how much of the LoRA matches it")
    lora_inspect.set_defaults(func=cmd_lora_inspect)
    _add_train_parser(sub)
    from diffstudio.control import cli as control_cli

    control_cli.add_annotate_parser(sub)

    from diffstudio.server import cli as server_cli

    server_cli.add_parser(sub)
    add_video_parser(sub)
    from diffstudio.video import img2vid_cli

    img2vid_cli.add_parser(sub)
    add_diffutoon_parser(sub)

    fastblend = sub.add_parser("fastblend", help="deflicker a stylised video or interpolate keyframes")
    fastblend.configure_later = _configure_fastblend
    _accept_threads_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 and one `error:` line for a user's mistake).

    ``diffstudio`` and ``python -m diffstudio`` land here.
    """
    prepare_threads()  # before anything imports torch
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "threads", None) is not None:
            set_threads(args.threads)
        return args.func(args)
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
    except DiffstudioError as err:  # the error's name is part of the interface (docs/files.md lists them)
        print(f"error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
    except BrokenPipeError:  # `diffstudio info ... | head`: the reader left; nothing to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as err:  # the output folder is not writable, the disk is full ...
        print(f"error: {_one_line(err)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
