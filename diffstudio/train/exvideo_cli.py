"""``diffstudio train exvideo``: train an ExVideo-SVD extension for an SVD model (docs/svd.md, "Training the
extension").

Importing this module imports no torch: the command line builds its parser before torch starts."""

from __future__ import annotations

import argparse
from dataclasses import fields


def add_parser(kinds) -> argparse.ArgumentParser:
    """Register ``exvideo`` on the ``train`` command's subparsers."""
    from diffstudio.train.exvideo_config import LOSS_WEIGHTINGS, SIGMA_SAMPLINGS, ExVideoTrainConfig
    from diffstudio.train.options import add_run_options

    d = ExVideoTrainConfig(data="", out="")
    p = kinds.add_parser("exvideo", help="train an ExVideo-SVD extension (long clips) on a folder of video clips",
                         description="The SVD UNet stays frozen; position tables and 3x3x3 convolutions (and by "
                                     "default the temporal transformer blocks) train on clips conditioned on their "
                                     "first frame. Runs on accelerate like `train lora` (docs/svd.md).")
    p.add_argument("--model", required=True, help="the SVD base: svd_xt.safetensors or a diffusers folder")
    p.add_argument("--data", required=True, help="clips: video files or folders of frames (captions are not used)")
    p.add_argument("--out", required=True, help="the extension file to write (.safetensors)")
    p.add_argument("--init", help="start from this extension file instead of the identity (e.g. ExVideo-SVD-128f)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per training clip")
    p.add_argument("--stride", type=int, default=d.stride, help="take every n-th frame of a clip")
    p.add_argument("--positions", type=int, help="rows of the position tables (default: --frames)")
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--tables-only", action="store_true",
                   help="train only the tables and convolutions, not the temporal transformer blocks")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate told to the model")
    p.add_argument("--motion-bucket", type=int, default=d.motion_bucket_id)
    p.add_argument("--noise-aug", type=float, default=d.noise_aug, help="noise on the conditioning frame")
    p.add_argument("--p-mean", type=float, default=d.p_mean, help="mean of ln(sigma)")
    p.add_argument("--p-std", type=float, default=d.p_std, help="spread of ln(sigma)")
    p.add_argument("--sigma-sampling", default=d.sigma_sampling, choices=SIGMA_SAMPLINGS)
    p.add_argument("--loss-weighting", default=d.loss_weighting, choices=LOSS_WEIGHTINGS)
    p.add_argument("--target-scale", type=float, default=d.target_scale, help="x0 target = this * clean latent")
    p.add_argument("--ema-decay", type=float, help="export an EMA of the weights with this decay, e.g. 0.999")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_run_options(p, steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup=d.warmup, optimizer=d.optimizer,
                    seed=d.seed, checkpoint_every=d.checkpoint_every, captions=False, shard=True)
    p.add_argument("--save-dtype", default=d.save_dtype, choices=["fp16", "bf16", "fp32"])
    p.set_defaults(func=cmd_train_exvideo)
    return p


def cmd_train_exvideo(args) -> int:
    from diffstudio.train.exvideo import train_exvideo
    from diffstudio.train.exvideo_config import ExVideoTrainConfig

    renamed = {"temporal": not args.tables_only, "motion_bucket_id": args.motion_bucket}
    values = {f.name: renamed[f.name] if f.name in renamed else getattr(args, f.name)
              for f in fields(ExVideoTrainConfig)}
    out = train_exvideo(ExVideoTrainConfig(**values))
    if out is not None:  # processes other than 0 write nothing
        print(f"wrote {out}")
    return 0
