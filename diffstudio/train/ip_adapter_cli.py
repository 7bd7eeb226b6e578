"""``diffstudio train ip-adapter``: train an IP-Adapter for an SD 1.x / SDXL model (docs/ipadapter.md, "Training").

Importing this module imports no torch: the command line builds its parser before torch starts."""

from __future__ import annotations

import argparse


def add_parser(kinds) -> argparse.ArgumentParser:
    """Register ``ip-adapter`` on the ``train`` command's subparsers."""
    from diffstudio.train.ip_adapter_config import IPAdapterTrainConfig
    from diffstudio.train.options import add_run_options

    d = IPAdapterTrainConfig(data="", out="")
    p = kinds.add_parser("ip-adapter", help="train an IP-Adapter (image prompts) on a folder of captioned images",
                         description="Each image is its own reference; the base model stays frozen, the adapter's "
                                     "projection and image keys/values train (and a Shapes image encoder with "
                                     "them). Runs on accelerate like `train lora` (docs/ipadapter.md, Training).")
    p.add_argument("--model", help="base model file or folder (default: the packaged Shapes demo model)")
    p.add_argument("--data", required=True, help="images + metadata.csv (file_name,text) or .txt captions")
    p.add_argument("--out", required=True, help="the IP-Adapter file to write (.safetensors)")
    p.add_argument("--image-encoder", help="a CLIP vision encoder (folder or file, kept frozen) or a Shapes encoder "
                                           "file; default: a new Shapes image encoder, trained with the adapter")
    encoder = p.add_mutually_exclusive_group()
    encoder.add_argument("--freeze-encoder", action="store_true",
                         help="keep a new Shapes encoder at its random initial weights (random colour features)")
    encoder.add_argument("--train-encoder", action="store_true", help="train a loaded Shapes encoder too")
    p.add_argument("--tokens", type=int, default=d.num_tokens, help="image tokens per image")
    p.add_argument("--encoder-size", type=int, default=d.encoder_size, help="a new Shapes encoder's input side")
    p.add_argument("--encoder-width", type=int, default=d.encoder_width,
                   help="a new Shapes encoder's per-pixel feature width")
    p.add_argument("--encoder-dim", type=int, default=d.encoder_dim, help="a new Shapes encoder's embedding width")
    p.add_argument("--image-dropout", type=float, default=d.image_dropout,
                   help="share of samples trained with the zero image embedding (keeps image CFG working)")
    p.add_argument("--resolution", type=int, help="bucket area = resolution^2 (default: the model's size)")
    p.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"],
                   help="bf16: the frozen base in bf16 (the adapter trains in fp32)")
    add_run_options(p, steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup=d.warmup,
                    caption_dropout=d.caption_dropout, optimizer=d.optimizer, seed=d.seed,
                    checkpoint_every=d.checkpoint_every)
    p.add_argument("--save-dtype", default=d.save_dtype, choices=["fp32", "fp16", "bf16"], help="the file's dtype")
    p.set_defaults(func=cmd_train_ip_adapter)
    return p


def cmd_train_ip_adapter(args) -> int:
    from diffstudio.train.ip_adapter import IPAdapterTrainConfig, train_ip_adapter

    train_encoder = False if args.freeze_encoder else True if args.train_encoder else None
    config = IPAdapterTrainConfig(
        data=args.data, out=args.out, model=args.model, image_encoder=args.image_encoder,
        train_encoder=train_encoder, num_tokens=args.tokens, encoder_size=args.encoder_size,
        encoder_width=args.encoder_width, encoder_dim=args.encoder_dim, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, lr_end=args.lr_end, snr_gamma=args.snr_gamma,
        caption_dropout=args.caption_dropout, image_dropout=args.image_dropout, resolution=args.resolution,
        buckets=not args.no_buckets, precision=args.precision, optimizer=args.optimizer, seed=args.seed,
        checkpoint_every=args.checkpoint_every, workdir=args.workdir, save_dtype=args.save_dtype,
        restart=args.restart)
    print(f"wrote {train_ip_adapter(config)}")
    return 0
