"""One Hunyuan-DiT forward: diffstudio vs diffusers' HunyuanDiT2DModel, same weights.

Hunyuan-DiT width (hidden 1408 = 16 heads x 88, MLP 6144, BERT 1024 x 77 + mT5 2048 x 256 text tokens,
v1.2: no size/style conditioning) at reduced depth (4 blocks of the release's 40: long skips included),
at 1024x1024 pixels: a 128x128 latent, 4096 image tokens. Our model holds the diffusers tensors
(converted: the fused Wqkv / kv_proj weights are concatenations, everything else shared), both get the
same inputs and the same RoPE tables. One warm-up forward each, then timed forwards alternating ours /
diffusers so that load from other processes hits both alike; medians and the ratio ours / diffusers
(< 1 = faster) are printed, with the relative difference of the outputs.

    python benchmarks/bench_hunyuan_dit.py                     # fp32 and bf16, 4 blocks, 1024 px
    python benchmarks/bench_hunyuan_dit.py --dtypes bf16 --repeats 3 --blocks 8
    python benchmarks/bench_hunyuan_dit.py --tiny              # seconds-long smoke run at a small width
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
from diffstudio.detect.hunyuan_dit import config_from_diffusers
from diffstudio.models.hunyuan_dit import HunyuanDiT, rope_2d

HUNYUAN_WIDTH = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, hidden_size=1408,
                     num_layers=4, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024,
                     cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                     sample_size=128, use_style_cond_and_image_meta_size=False)
TINY = {**HUNYUAN_WIDTH, "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32,
        "cross_attention_dim": 32, "cross_attention_dim_t5": 64, "pooled_projection_dim": 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(config: dict, dtype: torch.dtype, device: str):
    from diffusers import HunyuanDiT2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    ref = HunyuanDiT2DModel(**config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = HunyuanDiT(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(hunyuan_dit_from_diffusers(ref.state_dict()), assign=True)
    return ours.requires_grad_(False), ref.requires_grad_(False)


def make_inputs(config: dict, pixels: int, dtype, device, batch: int):
    g = torch.Generator().manual_seed(1)
    side = pixels // 8
    bert_mask = torch.zeros(batch, config["text_len"], dtype=torch.long)
    bert_mask[:, :20] = 1
    t5_mask = torch.zeros(batch, config["text_len_t5"], dtype=torch.long)
    t5_mask[:, :30] = 1
    grid = side // config["patch_size"]
    cos, sin = rope_2d(config["attention_head_dim"], grid, grid)
    return dict(x=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
                t=torch.full((batch,), 500.0, device=device),
                bert=torch.randn(batch, config["text_len"], config["cross_attention_dim"],
                                 generator=g).to(device, dtype),
                bert_mask=bert_mask.to(device),
                t5=torch.randn(batch, config["text_len_t5"], config["cross_attention_dim_t5"],
                               generator=g).to(device, dtype),
                t5_mask=t5_mask.to(device), rope=(cos.to(device), sin.to(device)))


def timed(fn, sync) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--pixels", type=int, default=1024, help="image side (latent = pixels / 8)")
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks (even; the release has 40)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a tiny width at 256 px (smoke test)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {**(TINY if args.tiny else HUNYUAN_WIDTH), "num_layers": args.blocks}
    pixels = 256 if args.tiny else args.pixels
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tokens = (pixels // 8 // 2) ** 2
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"hidden {config['num_attention_heads'] * config['attention_head_dim']}, {args.blocks} blocks, "
          f"{pixels}x{pixels} px = {tokens} image tokens, batch {args.batch}")
    print(f"{'dtype':<6}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours, ref = build(config, dtype, args.device)
        a = make_inputs(config, pixels, dtype, args.device, args.batch)
        out = {}

        def run_ours(a=a, out=out, model=ours):
            out["ours"] = model(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], None, None,
                                *a["rope"])

        def run_ref(a=a, out=out, model=ref):
            # diffusers embeds the timestep in its dtype (its pipeline passes t in the latents' dtype)
            out["ref"] = model(a["x"], a["t"].to(a["x"].dtype), encoder_hidden_states=a["bert"],
                               text_embedding_mask=a["bert_mask"],
                               encoder_hidden_states_t5=a["t5"], text_embedding_mask_t5=a["t5_mask"],
                               image_meta_size=None, style=None, image_rotary_emb=a["rope"], return_dict=False)[0]

        times: dict[str, list[float]] = {"ours": [], "ref": []}
        with torch.inference_mode():
            run_ours(), run_ref()  # warm-up
            sync()
            for i in range(args.repeats):
                order = (("ours", run_ours), ("ref", run_ref)) if i % 2 == 0 else (("ref", run_ref), ("ours", run_ours))
                for name, fn in order:
                    times[name].append(timed(fn, sync))
        t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
        err = ((out["ours"].float() - out["ref"].float()).norm() / out["ref"].float().norm()).item()
        print(f"{dtype_name:<6}{t_ours:>9.3f}{t_ref:>13.3f}{t_ours / t_ref:>8.2f}{err:>10.1e}", flush=True)
        del ours, ref


if __name__ == "__main__":
    main()
