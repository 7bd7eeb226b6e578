"""``diffstudio fastblend``: deflicker a stylised video, or render a video from keyframes.

    diffstudio fastblend --guide in.mp4 --style styled.mp4 -o out.mp4 [--mode fast]
    diffstudio fastblend --guide in.mp4 --keyframes keys/ -o out.mp4

Videos may be files or folders of frames; keyframes are images named by their frame number
(``00042.png``). Input frames are spilled to a temporary raw file and read back one window at a
time, and output frames are encoded as they are made, so memory stays bounded for any length.
The same command runs standalone as ``python -m diffstudio.video.fastblend``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from diffstudio.threads import set_threads
from diffstudio.video import video_io
from diffstudio.video.fastblend import MODES, DiskFrames, iter_blend, iter_interpolate


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--guide", required=True, help="the original video (file or folder of frames)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--style", help="the stylised video to deflicker (same size and length)")
    source.add_argument("--keyframes", help="folder of stylised keyframes named by frame number")
    parser.add_argument("-o", "--output", required=True, help="output video (.mp4/.mov/.mkv) or PNG folder")
    parser.add_argument("--mode", choices=MODES, default="fast", help="blending mode (default: fast)")
    parser.add_argument("--window-size", type=int, default=15, help="frames on each side (default: 15)")
    parser.add_argument("--batch-size", type=int, default=8, help="frame pairs matched at once (default: 8)")
    parser.add_argument("--minimum-patch-size", type=int, default=5, help="odd patch side (default: 5)")
    parser.add_argument("--num-iter", type=int, default=5, help="search iterations per level (default: 5)")
    parser.add_argument("--guide-weight", type=float, default=10.0, help="weight of the guide (default: 10)")
    parser.add_argument("--tracking-window-size", type=int, default=0, help="share matches (0: off)")
    parser.add_argument("--single-keyframe", action="store_true",
                        help="interpolation: render each frame from its nearest keyframe only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--fps", type=float, default=None, help="output frame rate (default: the guide's)")
    parser.add_argument("--crf", type=int, default=17, help="x264 quality of a video output (default: 17)")
    parser.add_argument("--tmp-dir", default=None, help="where decoded frames are spilled (default: temp)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastblend`` on the main CLI's subparsers; the lead calls ``run(args)``."""
    parser = subparsers.add_parser("fastblend", help="deflicker a stylised video or interpolate keyframes",
                                   description=__doc__.split("\n\n")[0])
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None):  # absent under `diffstudio fastblend` (its --threads is global there)
        set_threads(args.threads)
    fps = args.fps or video_io.video_fps(args.guide)
    options = dict(batch_size=args.batch_size, minimum_patch_size=args.minimum_patch_size,
                   num_iter=args.num_iter, guide_weight=args.guide_weight,
                   tracking_window_size=args.tracking_window_size, seed=args.seed, device=args.device,
                   progress=not args.quiet)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as scratch, \
            DiskFrames.spill(video_io.iter_frames(args.guide), scratch) as guides:
        if args.keyframes:
            keyframes = video_io.read_indexed_frames(args.keyframes)
            frames = iter_interpolate(keyframes, guides, single_keyframe=args.single_keyframe, **options)
            count = video_io.write_frames(args.output, frames, fps, args.crf)
        else:
            with DiskFrames.spill(video_io.iter_frames(args.style), scratch) as styles:
                frames = iter_blend(styles, guides, mode=args.mode, window_size=args.window_size, **options)
                count = video_io.write_frames(args.output, frames, fps, args.crf)
    if not args.quiet:
        print(f"wrote {count} frames to {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m diffstudio.video.fastblend",
                                               description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))
