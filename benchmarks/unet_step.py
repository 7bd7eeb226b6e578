"""One UNet forward (a sampling step's model call) at SD 1.5 or SDXL size: diffstudio vs diffusers.

Both models hold the *same* random weights (ours are the diffusers tensors renamed, shared in
memory) and see the same inputs. Runs alternate ours / diffusers within one process so load from
other processes hits both alike; we print medians and the ratio ours / diffusers (< 1 = faster).

    python benchmarks/unet_step.py                      # latent 32 and 64, fp32 and bf16, batch 2
    python benchmarks/unet_step.py --sizes 64 --dtypes bf16 --repeats 5
    python benchmarks/unet_step.py --model sdxl --sizes 64   # SDXL base UNet (2.57 B), 512x512
    python benchmarks/unet_step.py --tiny               # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.models.unet import UNetModel

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
             "norm_num_groups": 8, "attention_head_dim": 2}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 in_channels=4, out_channels=4, sample_size=128, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(diffusers_config: dict, dtype: torch.dtype, device: str):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # silence the ".to(dtype)" advice meant for from_pretrained
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**diffusers_config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = UNetModel(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), assign=True)  # shares the tensors
    return ours, ref


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (image / 8)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model", default="sd15", choices=list(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet instead of SD 1.5 (smoke test)")
    parser.add_argument("--diffusers-channels-last", action="store_true",
                        help="also put diffusers' UNet in channels_last (its opt-in; default NCHW)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TINY_UNET if args.tiny else CONFIGS[args.model]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':<6}{'latent':>7}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours, ref = build(config, dtype, args.device)
        if args.diffusers_channels_last:
            ref.to(memory_format=torch.channels_last)
        for size in args.sizes:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(args.batch, 4, size, size, generator=gen).to(args.device, dtype)
            t = torch.full((args.batch,), 500.0, device=args.device)
            ctx = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=gen)
            ctx = ctx.to(args.device, dtype)
            ours_kw, ref_kw = {}, {}
            if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size values
                from diffstudio.families.sdxl import vector_condition

                pooled = torch.randn(args.batch, 1280, generator=gen)
                sizes = torch.tensor([8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size])
                ours_kw["y"] = vector_condition(pooled, sizes, 2816).to(args.device, dtype)
                ref_kw["added_cond_kwargs"] = {"text_embeds": pooled.to(args.device, dtype),
                                               "time_ids": sizes.expand(args.batch, -1).to(args.device, dtype)}
            out = {}

            def run_ours(out=out, x=x, t=t, ctx=ctx, model=ours, kw=ours_kw):
                out["ours"] = model(x, t, ctx, **kw)
                sync()

            def run_ref(out=out, x=x, t=t, ctx=ctx, model=ref, kw=ref_kw):
                out["ref"] = model(x, t, ctx, **kw).sample
                sync()

            times: dict[str, list[float]] = {"ours": [], "ref": []}
            with torch.inference_mode():
                run_ours(), run_ref()  # warm-up (allocator, oneDNN / cuDNN kernel selection)
                for i in range(args.repeats):
                    # alternate which goes first so a load spike does not always hit the same one
                    order = (("ours", run_ours), ("ref", run_ref)) if i % 2 == 0 else \
                        (("ref", run_ref), ("ours", run_ours))
                    for name, fn in order:
                        times[name].append(timed(fn))
            a, b = statistics.median(times["ours"]), statistics.median(times["ref"])
            err = ((out["ours"].float() - out["ref"].float()).norm() / out["ref"].float().norm()).item()
            print(f"{dtype_name:<6}{size:>7}{a:>9.3f}{b:>13.3f}{a / b:>8.2f}{err:>10.1e}   "
                  f"ours {[round(v, 2) for v in times['ours']]} "
                  f"diffusers {[round(v, 2) for v in times['ref']]}",
                  flush=True)
        del ours, ref


if __name__ == "__main__":
    main()
