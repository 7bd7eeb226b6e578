"""``diffstudio train motion``: train AnimateDiff motion modules for a UNet model (docs/animatediff.md, "Training")."""

from __future__ import annotations

import argparse


def add_parser(kinds) -> argparse.ArgumentParser:
    """Register ``motion`` on the ``train`` command's subparsers."""
    from diffstudio.train.motion_config import MotionTrainConfig
    from diffstudio.train.options import add_run_options

    d = MotionTrainConfig(data="", out="")
    p = kinds.add_parser("motion", help="train AnimateDiff motion modules on a folder of video clips",
                         description="The base UNet stays frozen; only fresh motion modules train. Runs on "
                                     "accelerate like `train lora` (docs/animatediff.md, Training).")
    p.add_argument("--model", help="base model file or folder (default: the packaged Shapes demo model)")
    p.add_argument("--data", required=True, help="clips (video files or folders of frames) + metadata.csv "
                                                 "(file_name,text) or a .txt caption beside each clip")
    p.add_argument("--out", required=True, help="the motion module file to write (.safetensors)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per training clip")
    p.add_argument("--stride", type=int, default=d.stride, help="take every n-th frame of a clip")
    p.add_argument("--resolution", type=int, help="square frames of this side (default: the model's size)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="rows of the frame position table")
    p.add_argument("--mid-block", action="store_true", help="a module in the middle block too (v2 layout)")
    p.add_argument("--schedule", default=d.schedule, choices=["linear", "model"],
                   help="noise schedule: AnimateDiff's linear betas (default) or the base model's own")
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_run_options(p, steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup=d.warmup,
                    caption_dropout=d.caption_dropout, optimizer=d.optimizer, seed=d.seed,
                    checkpoint_every=d.checkpoint_every)
    p.add_argument("--save-dtype", default=d.save_dtype, choices=["fp16", "bf16", "fp32"])
    p.set_defaults(func=cmd_train_motion)
    return p


def cmd_train_motion(args) -> int:
    from diffstudio.train.motion import MotionTrainConfig, train_motion

    config = MotionTrainConfig(data=args.data, out=args.out, model=args.model, frames=args.frames,
                               stride=args.stride, resolution=args.resolution, max_frames=args.max_frames,
                               mid_block=args.mid_block, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup=args.warmup, lr_end=args.lr_end, schedule=args.schedule,
                               snr_gamma=args.snr_gamma, caption_dropout=args.caption_dropout,
                               gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                               seed=args.seed, checkpoint_every=args.checkpoint_every, workdir=args.workdir,
                               save_dtype=args.save_dtype, restart=args.restart)
    print(f"wrote {train_motion(config)}")
    return 0
