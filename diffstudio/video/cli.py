"""``diffstudio video``: AnimateDiff text-to-video and video re-rendering (docs/animatediff.md).

    diffstudio video "a boat on a lake" --model dreamshaper_8.safetensors --motion mm_sd_v15_v2.ckpt \\
        --frames 64 -o out.mp4
    diffstudio video "anime style" --model m.safetensors --motion mm.ckpt --input in.mp4 --strength 0.6 \\
        --smoother fastblend --smoother-steps 4,9,-1 --work-dir render/ -o out.mp4
    diffstudio video "the panda starts to play" --model CogVideoX-5b-I2V/ --image first.png --frames 49 -o out.mp4

Without ``--model`` the packaged Shapes demo model renders; without ``--motion`` every frame is rendered
on its own (context windows, same noise and the smoother still apply). Killed and started again with the
same arguments and ``--work-dir``, a render continues from its last finished step. A CogVideoX model
(docs/cogvideox.md) runs its own pipeline with the options it shares (frames, size, steps, cfg, seed, sampler,
input and strength, fps) and ``--image``, the first frame for its image-to-video models.
"""

from __future__ import annotations

import argparse
import sys

from diffstudio.sampling_names import SAMPLER_NAMES, SCHEDULER_NAMES


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--smoother-steps takes comma-separated step numbers (e.g. 4,9,-1), "
                                         f"got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from diffstudio.cli import add_winograd_option

    parser.add_argument("prompt")
    parser.add_argument("--motion", help="AnimateDiff motion module (.ckpt/.safetensors or a MotionAdapter folder)")
    parser.add_argument("--model", help="model file or diffusers folder (default: the packaged Shapes demo model)")
    parser.add_argument("--vae", help="a separate VAE file to use instead of the bundled one")
    parser.add_argument("-o", "--output", default="out.mp4", help="video file (.mp4/.mov/.mkv) or a folder for PNGs")
    parser.add_argument("--negative", default="")
    parser.add_argument("--frames", type=int, help="frames to render (default 16; with --input: all of it)")
    parser.add_argument("--input", help="video to re-render (file or folder of frames)")
    parser.add_argument("--image", help="CogVideoX image-to-video models (5B-I2V, 1.5-I2V): the first frame")
    parser.add_argument("--strength", type=float, help="with --input: how much to repaint (default 0.75)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME",
                        help=f"one of {', '.join(SAMPLER_NAMES)}; with --work-dir: euler, euler_ancestral, ddim, heun "
                             "or lcm")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME", help=", ".join(SCHEDULER_NAMES))
    parser.add_argument("--clip-skip", type=int)
    parser.add_argument("--context-length", type=int, default=16, help="frames the network sees at once (16)")
    parser.add_argument("--context-stride", type=int, help="frames between window starts (default: half the length)")
    parser.add_argument("--context-dilation", type=int, default=1, metavar="D",
                        help="a window's frames lie D apart, so the module's motion spans D times as many frames "
                             "(frames / context length: one motion over the whole video)")
    parser.add_argument("--same-noise", action="store_true", help="start every frame from the same noise")
    parser.add_argument("--smoother", choices=["fastblend"], help="in-loop deflicker (DiffSynth's method)")
    parser.add_argument("--smoother-steps", type=_steps, default=[],
                        help="steps whose x0 is smoothed, e.g. 4,9,14,19; -1 = after decoding (default: -1)")
    parser.add_argument("--work-dir", help="save the state after every step here; a rerun continues from it")
    parser.add_argument("--restart", action="store_true", help="discard the work folder's state and start over")
    parser.add_argument("--fps", type=float, help="output frame rate (default: the input's, else 8)")
    parser.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", help="apply a LoRA (repeatable)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"])
    parser.add_argument("--device", default="cpu")
    add_winograd_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_video_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``video`` on the main CLI's subparsers."""
    parser = subparsers.add_parser("video", help="AnimateDiff (and CogVideoX) text-to-video and video re-rendering",
                                   description=__doc__.split("\n\n")[0])
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import diffstudio
    from diffstudio.cli import apply_winograd_option, check_device, lora_spec, torch_dtype
    from diffstudio.video import video_io
    from diffstudio.video.render import VideoPipeline
    from diffstudio.video.workdir import check_sampler

    video_io.check_output(args.output)  # every mistake that needs no model fails before the model loads
    if args.input is not None:
        video_io.check_source(args.input, "input video")
    if args.image is not None:
        from diffstudio.io.folders import existing_path

        existing_path(args.image, "first frame (--image)")
    if args.work_dir is not None and args.sampler is not None:
        check_sampler(args.sampler)
    check_device(args.device)
    paths = [args.model] if args.model else []
    if args.vae:
        paths.append(args.vae)
    models = diffstudio.load(*paths, dtype=torch_dtype(args.dtype), device=args.device)
    apply_winograd_option(models, args)
    if models.family.name == "cogvideox":
        return _run_cogvideox(models, args)
    if args.image is not None:
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError("--image is the first frame for CogVideoX image-to-video models; for "
                                f"{models.family.name} use --input (a video to re-render)")
    if args.motion:
        models.add_motion_module(args.motion)
    for spec in args.lora or ():
        file, strength = lora_spec(spec)
        models.apply_lora(file, strength)
    out = VideoPipeline(models)(
        args.prompt, args.negative, num_frames=args.frames, width=args.width, height=args.height,
        steps=args.steps, cfg_scale=args.cfg, seed=args.seed, sampler=args.sampler, scheduler=args.scheduler,
        clip_skip=args.clip_skip, init_video=args.input, strength=args.strength,
        context_length=args.context_length, context_stride=args.context_stride,
        context_dilation=args.context_dilation, same_noise=args.same_noise,
        smoother=args.smoother, smoother_steps=args.smoother_steps, work_dir=args.work_dir, restart=args.restart,
        output=args.output, fps=args.fps, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0


# Options of the AnimateDiff render that CogVideoPipeline has no use for (parser defaults: not given).
NOT_FOR_COGVIDEOX = ("motion", "scheduler", "clip_skip", "context_stride", "same_noise", "smoother", "smoother_steps",
                     "work_dir", "restart")


def _run_cogvideox(models, args: argparse.Namespace) -> int:
    from diffstudio.cli import lora_spec
    from diffstudio.errors import InvalidInputError
    from diffstudio.video.cogvideo import CogVideoPipeline

    unused = [f"--{name.replace('_', '-')}" for name in NOT_FOR_COGVIDEOX if getattr(args, name)]
    if unused:
        raise InvalidInputError(f"{', '.join(unused)}: AnimateDiff options; CogVideoX does not take them")
    for spec in args.lora or ():
        file, strength = lora_spec(spec)
        models.apply_lora(file, strength)
    given = dict(num_frames=args.frames, width=args.width, height=args.height, steps=args.steps, cfg_scale=args.cfg,
                 sampler=args.sampler, init_video=args.input, strength=args.strength, fps=args.fps, image=args.image)
    out = CogVideoPipeline(models)(args.prompt, args.negative, seed=args.seed, output=args.output,
                                   **{k: v for k, v in given.items() if v is not None})
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0
