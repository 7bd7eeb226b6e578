"""``diffstudio img2vid``: Stable Video Diffusion image-to-video (docs/svd.md).

    diffstudio img2vid photo.png --model svd_xt.safetensors -o out.mp4 --frames 25 --fps 7 --motion-bucket 127
    diffstudio img2vid photo.png --model svd_xt.safetensors --extension ExVideo-SVD-128f-v1.safetensors \
        --preset exvideo-128 -o long.mp4
"""

from __future__ import annotations

import argparse
import sys

from diffstudio.sampling_names import SAMPLER_NAMES, SCHEDULER_NAMES

# --preset NAME -> the pipeline arguments it sets (video/svd.py's EXVIDEO_128F, written out here so that the parser
# is built without importing torch; a test checks the two agree).
PRESETS = {"exvideo-128": dict(num_frames=128, width=512, height=512, steps=50, fps=30, motion_bucket_id=127,
                               min_cfg=2.0, max_cfg=2.0, post_normalize=True, contrast=1.2)}
PRESET_NEEDS_EXTENSION = {"exvideo-128": 128}  # position-table rows the preset's frame count needs


def add_parser(subparsers) -> argparse.ArgumentParser:
    from diffstudio.cli import add_winograd_option

    parser = subparsers.add_parser("img2vid", help="Stable Video Diffusion: animate an image",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("--model", required=True, help="svd.safetensors / svd_xt.safetensors or a diffusers folder")
    parser.add_argument("--extension", action="append", default=[], metavar="FILE",
                        help="an ExVideo-SVD extension grafted onto the UNet (e.g. ExVideo-SVD-128f-v1)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a released recipe; explicit options override its values. exvideo-128: 128 frames at "
                             "512x512, 50 steps, fps 30, cfg 2, contrast 1.2 (needs --extension)")
    parser.add_argument("-o", "--output", default="out.mp4", help="video file (.mp4/.mov/.mkv) or a folder for PNGs")
    parser.add_argument("--frames", type=int, help="frames to make (default 25; SVD was trained on 14)")
    parser.add_argument("--width", type=int, help="default 1024")
    parser.add_argument("--height", type=int, help="default 576")
    parser.add_argument("--fps", type=int, help="frame rate of the video, told to the model (default 7)")
    parser.add_argument("--motion-bucket", type=int, help="more motion when higher (default 127)")
    parser.add_argument("--noise-aug", type=float, help="noise added to the image (default 0.02)")
    parser.add_argument("--min-cfg", type=float, help="guidance at the first frame (default 1)")
    parser.add_argument("--max-cfg", type=float, help="guidance at the last frame (default 3)")
    parser.add_argument("--contrast", type=float, help="scale the final latents (default 1; exvideo-128: 1.2)")
    parser.add_argument("--post-normalize", action="store_true", default=None,
                        help="standardise each frame's latent to the clip's mean and std before decoding")
    parser.add_argument("--steps", type=int, help="default 25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME", help=", ".join(SAMPLER_NAMES))
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME", help="default karras")
    parser.add_argument("--decode-chunk", type=int, help="frames decoded at once (default 8; memory grows with it)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"])
    parser.add_argument("--device", default="cpu")
    add_winograd_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def pipeline_settings(args: argparse.Namespace) -> dict:
    """The pipeline's keyword arguments: the preset's values, overridden by every option given explicitly."""
    given = dict(num_frames=args.frames, width=args.width, height=args.height, fps=args.fps,
                 motion_bucket_id=args.motion_bucket, noise_aug_strength=args.noise_aug, min_cfg=args.min_cfg,
                 max_cfg=args.max_cfg, steps=args.steps, sampler=args.sampler, scheduler=args.scheduler,
                 decode_chunk_size=args.decode_chunk, contrast=args.contrast, post_normalize=args.post_normalize)
    settings = dict(PRESETS[args.preset]) if args.preset else {}
    settings.update({k: v for k, v in given.items() if v is not None})
    settings.setdefault("contrast", 1.0)
    settings.setdefault("post_normalize", False)
    return settings


def run(args: argparse.Namespace) -> int:
    from diffstudio.cli import apply_winograd_option, check_device, torch_dtype
    from diffstudio.io.folders import existing_path
    from diffstudio.video import video_io
    from diffstudio.video.svd import SVDPipeline
    from diffstudio.video.svd_loading import load_svd

    video_io.check_output(args.output)  # mistakes that need no model fail before it loads
    existing_path(args.image, "input image")
    check_device(args.device)
    if args.preset in PRESET_NEEDS_EXTENSION and not args.extension:
        from diffstudio.errors import InvalidInputError

        raise InvalidInputError(f"--preset {args.preset} makes {PRESET_NEEDS_EXTENSION[args.preset]} frames, which "
                                "SVD runs with an ExVideo extension: pass --extension "
                                "ExVideo-SVD-128f-v1.safetensors (or one trained with `diffstudio train exvideo`)")
    settings = pipeline_settings(args)
    models = load_svd(args.model, *args.extension, dtype=torch_dtype(args.dtype), device=args.device)
    apply_winograd_option(models, args)
    out = SVDPipeline(models)(args.image, seed=args.seed, output=args.output, progress=not args.quiet, **settings)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0
