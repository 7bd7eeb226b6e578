"""One FLUX transformer forward: diffstudio vs diffusers' FluxTransformer2DModel, same weights.

FLUX.1 width (hidden 3072 = 24 heads x 128, MLP x4, T5 context 4096, CLIP vector 768) at reduced
depth (2 double + 4 single blocks, of the release's 19 + 38), at 512x512 pixels: 1024 image tokens
plus 512 text tokens, batch 1, guidance-distilled (dev). Our model holds the diffusers tensors
(converted; the fused qkv / linear1 weights are concatenations, everything else shared). One
warm-up forward each, then timed forwards alternating ours / diffusers so that load from other
processes hits both alike; medians and the ratio ours / diffusers (< 1 = faster) are printed.

Targets (the issue): ratio <= 0.9 in fp32, <= 0.75 in bf16.

    python benchmarks/bench_flux.py                       # fp32 and bf16, full width
    python benchmarks/bench_flux.py --dtypes bf16 --repeats 3
    python benchmarks/bench_flux.py --tiny                # seconds-long smoke run at a small width
"""

from __future__ import annotations

import torch
from common import DTYPES, arguments, race, same_weights, start

from diffstudio.convert.flux import flux_from_diffusers
from diffstudio.detect.flux import config_from_diffusers
from diffstudio.models.flux import FluxTransformer, image_ids, pack_latents

FLUX_WIDTH = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
TINY = {**FLUX_WIDTH, "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32}


def build(config: dict, dtype: torch.dtype, device: str):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return same_weights(ref, lambda c: FluxTransformer(config_from_diffusers(c)), flux_from_diffusers), ref


def make_inputs(config: dict, pixels: int, text_tokens: int, dtype, device, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    side = pixels // 8
    latent = torch.randn(batch, 16, side, side, generator=g)
    return dict(img=pack_latents(latent).to(device, dtype), img_ids=image_ids(side, side).to(device),
                txt=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g).to(device, dtype),
                txt_ids=torch.zeros(text_tokens, 3, device=device),
                timesteps=torch.full((batch,), 0.7, device=device),
                y=torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
                guidance=torch.full((batch,), 3.5, device=device))


def compare(config: dict, dtype: torch.dtype, args, sync):
    ours, ref = build(config, dtype, args.device)
    x = make_inputs(config, args.pixels, args.text_tokens, dtype, args.device)
    return race(lambda: ours(**x),
                lambda: ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                            timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                            guidance=x["guidance"], return_dict=False)[0],
                args.repeats, sync)


def main() -> None:
    parser = arguments(__doc__, tiny="2 heads of 128 instead of 24 (smoke test)")
    parser.add_argument("--pixels", type=int, default=512, help="image side in pixels (512: 1024 image tokens)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (dev: 512)")
    args = parser.parse_args()
    sync = start(args)
    config = TINY if args.tiny else FLUX_WIDTH
    print(f"hidden {config['num_attention_heads'] * config['attention_head_dim']}, blocks "
          f"{config['num_layers']} + {config['num_single_layers']}, {(args.pixels // 16) ** 2} image + "
          f"{args.text_tokens} text tokens, batch 1")
    print(f"{'dtype':<6}{'time':<6}{'ours s':>9}{'diffusers s':>13}{'ratio':>8}{'rel err':>10}")
    for name in args.dtypes:
        r = compare(config, DTYPES[name], args, sync)
        for what, mo, mr in (("wall", r.ours_wall, r.ref_wall), ("cpu", r.ours_cpu, r.ref_cpu)):
            print(f"{name:<6}{what:<6}{mo:>9.3f}{mr:>13.3f}{mo / mr:>8.2f}{r.rel_err:>10.1e}", flush=True)

if __name__ == "__main__":
    main()
