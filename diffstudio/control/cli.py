"""The ControlNet commands: ``diffstudio train controlnet`` and ``diffstudio annotate`` (docs/controlnet.md)."""

from __future__ import annotations

from diffstudio.control.names import ANNOTATORS, DETECTED, LEARNED


def _widths(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def cmd_train_controlnet(args) -> int:
    from diffstudio.train.controlnet import ControlNetTrainConfig, train_controlnet

    config = ControlNetTrainConfig(data=args.data, out=args.out, model=args.model,
                                   hint_block_channels=args.hint_channels, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, lr_end=args.lr_end,
                                   snr_gamma=args.snr_gamma, resolution=args.resolution, buckets=not args.no_buckets,
                                   precision=args.precision, optimizer=args.optimizer,
                                   caption_dropout=args.caption_dropout, seed=args.seed,
                                   checkpoint_every=args.checkpoint_every, workdir=args.workdir,
                                   save_dtype=args.save_dtype, restart=args.restart,
                                   shard=args.shard)
    print(f"wrote {train_controlnet(config)}")
    return 0


def add_train_parser(kinds) -> None:
    """``train controlnet`` under the ``train`` command's sub-parsers ``kinds``."""
    from diffstudio.train.options import add_run_options

    p = kinds.add_parser("controlnet", help="train a ControlNet for an SD 1.x / SDXL model",
                         description="Trains a ControlNet initialised from the base UNet's encoder; the base stays "
                                     "frozen. Runs on accelerate like LoRA training, in one process or several "
                                     "(docs/controlnet.md, docs/scale.md).")
    p.add_argument("--model", help="base model file or folder (default: the packaged Shapes demo model)")
    p.add_argument("--data", required=True,
                   help="a folder with metadata.csv (file_name,conditioning_image,text) and the images")
    p.add_argument("--out", required=True, help="the ControlNet file to write (.safetensors)")
    p.add_argument("--hint-channels", type=_widths, default=[16, 32, 96, 256],
                   help="widths of the hint encoder's stages, comma-separated (default: the released 16,32,96,256)")
    p.add_argument("--resolution", type=int, help="bucket area = resolution^2 (default: the model's size)")
    p.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the frozen base in bf16 (the ControlNet trains in fp32)")
    add_run_options(p, steps=1000, batch_size=1, lr=1e-5, shard=True)
    p.add_argument("--save-dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="the file's dtype")
    p.set_defaults(func=cmd_train_controlnet)


def cmd_annotate(args) -> int:
    from diffstudio.control import annotators

    if args.kind in LEARNED or args.kind in DETECTED:  # networks with weight files from the annotator folder
        options = {"detect_resolution": args.detect_resolution}
        if args.image_resolution is not None:  # else each annotator's own default
            options["image_resolution"] = args.image_resolution
        if args.kind == "hed":
            options["safe"] = args.safe
        image = getattr(annotators, args.kind)(args.image, args.annotators, **options)
    else:
        options = {"canny": (args.low, args.high), "tile": (args.factor,), "blur": (args.radius,)}
        image = getattr(annotators, args.kind)(args.image, *options.get(args.kind, ()))
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


def add_annotate_parser(sub) -> None:
    """``annotate --kind canny IMAGE -o OUT``: a control image from a picture (hed and lineart_* read weights)."""
    p = sub.add_parser("annotate", help="make a ControlNet control image (canny edges, line art, soft edges, tile, "
                                        "blur) from a picture",
                       description="hed, lineart_realistic and lineart_coarse are the learned annotators: they read "
                                   "ControlNetHED.pth, sk_model.pth, sk_model2.pth (lllyasviel/Annotators) from "
                                   "--annotators DIR or $DIFFSTUDIO_ANNOTATORS. depth, openpose, normal, mlsd and "
                                   "pidinet run through controlnet-aux (installed separately) with their files from "
                                   "that folder (docs/controlnet.md).")
    p.add_argument("image")
    p.add_argument("--kind", required=True, choices=ANNOTATORS)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--low", type=float, default=100, help="canny: the lower hysteresis threshold")
    p.add_argument("--high", type=float, default=200, help="canny: the upper hysteresis threshold")
    p.add_argument("--factor", type=float, default=4.0, help="tile: how many times smaller the averaged image is")
    p.add_argument("--radius", type=float, default=4.0, help="blur: the Gaussian's radius in pixels")
    p.add_argument("--annotators", help="the learned and controlnet-aux kinds: the folder with the weight files "
                                        "(default: $DIFFSTUDIO_ANNOTATORS)")
    p.add_argument("--detect-resolution", type=int, default=512,
                   help="learned and controlnet-aux kinds: the short side the network sees (rounded to "
                        "multiples of 64)")
    p.add_argument("--image-resolution", type=int,
                   help="learned and controlnet-aux kinds: the output's short side, controlnet-aux's sizing "
                        "(default: the input's size; 512 for the controlnet-aux kinds)")
    p.add_argument("--safe", action="store_true", help="hed: quantise the edges to steps of 1/2 (softedge_hedsafe)")
    p.set_defaults(func=cmd_annotate)
