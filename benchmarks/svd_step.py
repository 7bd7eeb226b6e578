"""One SVD spatio-temporal UNet forward (a sampling step's model call): diffstudio's ``SVDUNet`` vs diffusers'
``UNetSpatioTemporalConditionModel``.

The model is the released SVD-XT UNet's layout (``release_configs.SVD_XT_UNET``: four levels, attention on the
first three, a temporal layer after every spatial one, 64-wide heads, 1024-wide image embedding) at a reduced
width by default (``--width``, a fraction of the released 320-640-1280-1280 channels, heads kept 64 wide), so that
a run fits a few minutes on 2 CPU cores; ``--width 1`` is the full 1.52 B-parameter model. Both models hold the
*same* random weights (ours are the diffusers tensors renamed, shared in memory) and see the same inputs: the
classifier-free-guidance batch the SVD pipeline runs (2 videos: the image embedding and zeros), 14 frames,
8 latent channels. diffusers builds three levels' ResBlocks with GroupNorm eps 1e-6 where the release (and we)
use 1e-5; the reference is aligned to 1e-5 so that the error column measures the arithmetic.

    python benchmarks/svd_step.py                                # width 0.6, latent 16, fp32 and bf16
    python benchmarks/svd_step.py --width 1 --dtypes fp32 --repeats 1   # the released width (~40 s a step)
    python benchmarks/svd_step.py --tiny                          # a seconds-long smoke run
"""

from __future__ import annotations

import torch
from common import DTYPES, arguments, race, same_weights, start

from diffstudio.convert.svd_unet import svd_unet_from_diffusers
from diffstudio.detect.svd_unet import config_from_diffusers
from diffstudio.models.svd_unet import SVDUNet
from diffstudio.release_configs import SVD_XT_UNET

HEAD_WIDTH = 64


def scaled(width: float) -> dict:
    """SVD-XT's config with every level's channels times ``width``, rounded to whole 64-wide heads (the levels keep
    the release's 1-2-4-4 multiples of the first)."""
    first = SVD_XT_UNET["block_out_channels"][0]
    base = max(1, round(first * width / HEAD_WIDTH))
    heads = [base * c // first for c in SVD_XT_UNET["block_out_channels"]]
    return {**SVD_XT_UNET, "block_out_channels": tuple(h * HEAD_WIDTH for h in heads),
            "num_attention_heads": tuple(heads)}


def build(config: dict, dtype: torch.dtype, device: str):
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

    torch.manual_seed(0)
    ref = UNetSpatioTemporalConditionModel(**config)
    for module in ref.modules():  # the release's GroupNorm eps (see the module docstring)
        if isinstance(module, (ResnetBlock2D, TemporalResnetBlock)):
            module.norm1.eps = module.norm2.eps = 1e-5
    ref = ref.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return same_weights(ref, lambda c: SVDUNet(config_from_diffusers(c)), svd_unet_from_diffusers), ref


def one_dtype(config: dict, dtype_name: str, inputs: tuple, t: torch.Tensor, args, sync) -> None:
    dtype = DTYPES[dtype_name]
    ours, ref = build(config, dtype, args.device)
    params = sum(p.numel() for p in ref.parameters())
    x, context, ids = (v.to(args.device, dtype) for v in inputs)
    r = race(lambda: ours(x, t, context, ids), lambda: ref(x, t, context, ids).sample, args.repeats, sync)
    print(f"{dtype_name:<6}{params / 1e6:>8.0f}M{r.ours_wall:>9.2f}{r.ref_wall:>13.2f}{r.ratio:>8.2f}"
          f"{r.ours_cpu:>10.2f}{r.ref_cpu:>10.2f}{r.rel_err:>10.1e}", flush=True)


def main() -> None:
    parser = arguments(__doc__, repeats=3, tiny="the smallest width (64-64-64-64 channels, one head; smoke test)")
    parser.add_argument("--width", type=float, default=0.6, help="fraction of the released channel widths")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--size", type=int, default=16, help="latent side (pixels / 8)")
    args = parser.parse_args()
    sync = start(args)
    config = scaled(0.0 if args.tiny else args.width)
    print(f"block_out_channels {config['block_out_channels']}, heads {config['num_attention_heads']}, "
          f"batch 2 x {args.frames} frames, latent {args.size}x{args.size}", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, args.frames, 8, args.size, args.size, generator=gen)
    context = torch.cat([torch.randn(1, 1, 1024, generator=gen), torch.zeros(1, 1, 1024)])  # image / unconditional
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)  # fps - 1, motion bucket, noise augmentation
    t = torch.full((2,), 0.25 * 2.0, device=args.device)  # c_noise at sigma = e^2
    print(f"{'dtype':<6}{'params':>9}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'ours cpu':>10}{'diff cpu':>10}"
          f"{'rel err':>10}")
    for dtype_name in args.dtypes:
        one_dtype(config, dtype_name, (x, context, ids), t, args, sync)


if __name__ == "__main__":
    main()
