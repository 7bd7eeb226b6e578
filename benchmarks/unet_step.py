"""One UNet forward (a sampling step's model call) at SD 1.5 or SDXL size: diffstudio vs diffusers.

Both models hold the *same* random weights (ours are the diffusers tensors renamed, shared in
memory) and see the same inputs. Runs alternate ours / diffusers within one process so load from
other processes hits both alike; we print medians and the ratio ours / diffusers (< 1 = faster).

    python benchmarks/unet_step.py                      # latent 32 and 64, fp32 and bf16, batch 2
    python benchmarks/unet_step.py --sizes 64 --dtypes bf16 --repeats 5
    python benchmarks/unet_step.py --model sdxl --sizes 64   # SDXL base UNet (2.57 B), 512x512
    python benchmarks/unet_step.py --tiny               # a seconds-long smoke run
    python benchmarks/unet_step.py --sizes 64 --tome 0.5     # ours with token merging vs plain diffusers
    python benchmarks/unet_step.py --sizes 64 --tome 0.5 --tome-reference   # vs diffusers patched by tomesd
    python benchmarks/unet_step.py --sizes 64 32 --dtypes fp32 --winograd [wide]   # ours with Winograd convolutions
    python benchmarks/unet_step.py --sizes 64 --deep-cache 2   # per step over DeepCache cycles (1 full + 2 reused)

With ``--deep-cache K`` a timed run is K + 1 calls on each side: ours one full pass and K DeepCache passes from its
feature (pipeline/deep_cache.py, branch 0), diffusers K + 1 full passes; the ratio is then per sampling step. Each
pass sees the same input, from which a reused pass equals the full one (the error column); in sampling the inputs
move between steps, and DeepCache's effect on quality is measured on the Shapes model (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from common import DTYPES, arguments, race, same_weights, start

from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.models.unet import UNetModel
from diffstudio.release_configs import SD15_UNET, SDXL_UNET

TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
             "norm_num_groups": 8, "attention_head_dim": 2}
CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}


def build(diffusers_config: dict, dtype: torch.dtype, device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**diffusers_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return same_weights(ref, lambda c: UNetModel(config_from_diffusers(c)), unet_from_diffusers), ref


def compare(ours, ref, config: dict, size: int, dtype: torch.dtype, args, sync):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, size, size, generator=gen).to(args.device, dtype)
    t = torch.full((args.batch,), 500.0, device=args.device)
    ctx = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=gen).to(args.device, dtype)
    ours_kw, ref_kw = {}, {}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size values
        from diffstudio.families.sdxl import vector_condition

        pooled = torch.randn(args.batch, 1280, generator=gen)
        sizes = torch.tensor([8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size])
        ours_kw["y"] = vector_condition(pooled, sizes, 2816).to(args.device, dtype)
        ref_kw["added_cond_kwargs"] = {"text_embeds": pooled.to(args.device, dtype),
                                       "time_ids": sizes.expand(args.batch, -1).to(args.device, dtype)}
    if args.tome:
        from diffstudio.models.token_merge import TokenMerge, TokenMerging

        settings = TokenMerge(args.tome)
        ours_kw["token_merge"] = TokenMerging(settings, torch.Generator().manual_seed(0))
    if args.deep_cache:
        from diffstudio.pipeline.deep_cache import FeatureSlot

        def cycle():
            slot = FeatureSlot(branch=0)
            for call in range(args.deep_cache + 1):
                slot.reuse = call > 0
                out = ours(x, t, ctx, feature_cache=slot, **ours_kw)
            return out

        def reference_cycle():
            for _ in range(args.deep_cache + 1):
                out = ref(x, t, ctx, **ref_kw).sample
            return out

        return race(cycle, reference_cycle, args.repeats, sync)
    return race(lambda: ours(x, t, ctx, **ours_kw), lambda: ref(x, t, ctx, **ref_kw).sample, args.repeats, sync)


def main() -> None:
    parser = arguments(__doc__, repeats=3, tiny="a tiny UNet instead of SD 1.5 (smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (image / 8)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--model", default="sd15", choices=list(CONFIGS))
    parser.add_argument("--diffusers-channels-last", action="store_true",
                        help="also put diffusers' UNet in channels_last (its opt-in; default NCHW)")
    parser.add_argument("--tome", type=float, help="token merging ratio for our UNet (ToMe; the error column is then "
                                                   "the merge's effect unless --tome-reference)")
    parser.add_argument("--tome-reference", action="store_true", help="patch diffusers' UNet with tomesd too")
    parser.add_argument("--deep-cache", type=int, metavar="K",
                        help="time DeepCache cycles: ours 1 full + K reused passes against K + 1 diffusers passes")
    parser.add_argument("--winograd", nargs="?", const="on", choices=["on", "wide"],
                        help="our UNet's 3x3 convolutions by Winograd F(4x4, 3x3) (Models.winograd; fp32 on the "
                             "CPU); wide: the widest layers too")
    args = parser.parse_args()
    sync = start(args)
    config = TINY_UNET if args.tiny else CONFIGS[args.model]
    print(f"{'dtype':<6}{'latent':>7}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours, ref = build(config, dtype, args.device)
        if args.winograd:
            from diffstudio.models.winograd import use_winograd

            use_winograd(ours, wide=args.winograd == "wide")
        if args.diffusers_channels_last:
            ref.to(memory_format=torch.channels_last)
        if args.tome and args.tome_reference:
            import tomesd

            tomesd.apply_patch(ref, ratio=args.tome, max_downsample=1, use_rand=True)
            ref._tome_info["args"]["generator"] = torch.Generator().manual_seed(0)  # the draws ours make
        for size in args.sizes:
            r = compare(ours, ref, config, size, dtype, args, sync)
            print(f"{dtype_name:<6}{size:>7}{r.ours_wall:>9.3f}{r.ref_wall:>13.3f}{r.ratio:>8.2f}{r.rel_err:>10.1e}",
                  flush=True)
        del ours, ref


if __name__ == "__main__":
    main()
