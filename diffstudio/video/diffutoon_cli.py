"""``diffstudio diffutoon config.json``: a Diffutoon render described by a config file (docs/diffutoon.md).

    diffstudio diffutoon toon.yaml              # render; killed and started again, it continues (output.work_dir)
    diffstudio diffutoon toon.yaml --dry-run    # the resolved plan: frames, sizes, windows, UNet calls, memory

Building the parser imports nothing heavy; the config is read and checked before any model loads.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_diffutoon_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``diffutoon`` on the main CLI's subparsers."""
    parser = subparsers.add_parser("diffutoon", help="toon-shade a video (Diffutoon) from a JSON/YAML config file",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the config file (.json, .yaml or .yml; schema: docs/diffutoon.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and stop")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--restart", action="store_true", help="discard the work folder's saved stages' state")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from diffstudio.video.diffutoon_config import load_config

    spec, kwargs, output = load_config(args.config)  # every mistake in the file fails before a model loads
    if not args.dry_run:
        from diffstudio.video import video_io

        video_io.check_output(output["path"])
    import diffstudio
    from diffstudio.cli import check_device, torch_dtype
    from diffstudio.video.diffutoon import toon_shade

    check_device(spec.get("device") or "cpu")
    paths = [p for p in (spec.get("model"), spec.get("vae")) if p]
    models = diffstudio.load(*paths, dtype=torch_dtype(spec.get("dtype") or "fp32"), device=spec.get("device") or "cpu")
    models.add_motion_module(spec["motion"])
    for lora in spec["loras"]:
        models.apply_lora(lora["file"], float(lora.get("strength", 1.0)))
    result = toon_shade(models, kwargs.pop("video"), kwargs.pop("prompt"), dry_run=args.dry_run,
                        restart=args.restart, progress=not args.quiet, **kwargs)
    if args.dry_run:
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.describe())
    elif not args.quiet:
        print(f"wrote {result}", file=sys.stderr)
    return 0
