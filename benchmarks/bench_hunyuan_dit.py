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

import torch
from common import DTYPES, arguments, race, same_weights, start

from diffstudio.convert.hunyuan_dit import hunyuan_dit_from_diffusers
from diffstudio.detect.hunyuan_dit import config_from_diffusers
from diffstudio.models.hunyuan_dit import HunyuanDiT, rope_2d

HUNYUAN_WIDTH = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, hidden_size=1408,
                     num_layers=4, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024,
                     cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                     sample_size=128, use_style_cond_and_image_meta_size=False)
TINY = {**HUNYUAN_WIDTH, "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32,
        "cross_attention_dim": 32, "cross_attention_dim_t5": 64, "pooled_projection_dim": 32}


def build(config: dict, dtype: torch.dtype, device: str):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    ref = HunyuanDiT2DModel(**config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return same_weights(ref, lambda c: HunyuanDiT(config_from_diffusers(c)), hunyuan_dit_from_diffusers), ref


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


def compare(config: dict, pixels: int, dtype: torch.dtype, args, sync):
    ours, ref = build(config, dtype, args.device)
    a = make_inputs(config, pixels, dtype, args.device, args.batch)
    return race(lambda: ours(a["x"], a["t"], a["bert"], a["bert_mask"], a["t5"], a["t5_mask"], None, None,
                             *a["rope"]),
                # diffusers embeds the timestep in its dtype (its pipeline passes t in the latents' dtype)
                lambda: ref(a["x"], a["t"].to(a["x"].dtype), encoder_hidden_states=a["bert"],
                            text_embedding_mask=a["bert_mask"], encoder_hidden_states_t5=a["t5"],
                            text_embedding_mask_t5=a["t5_mask"], image_meta_size=None, style=None,
                            image_rotary_emb=a["rope"], return_dict=False)[0],
                args.repeats, sync)


def main() -> None:
    parser = arguments(__doc__, tiny="a tiny width at 256 px (smoke test)")
    parser.add_argument("--pixels", type=int, default=1024, help="image side (latent = pixels / 8)")
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks (even; the release has 40)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    sync = start(args)
    config = {**(TINY if args.tiny else HUNYUAN_WIDTH), "num_layers": args.blocks}
    pixels = 256 if args.tiny else args.pixels
    tokens = (pixels // 8 // 2) ** 2
    print(f"hidden {config['num_attention_heads'] * config['attention_head_dim']}, {args.blocks} blocks, "
          f"{pixels}x{pixels} px = {tokens} image tokens, batch {args.batch}")
    print(f"{'dtype':<6}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for dtype_name in args.dtypes:
        r = compare(config, pixels, DTYPES[dtype_name], args, sync)
        print(f"{dtype_name:<6}{r.ours_wall:>9.3f}{r.ref_wall:>13.3f}{r.ratio:>8.2f}{r.rel_err:>10.1e}", flush=True)

if __name__ == "__main__":
    main()
