"""torch.compile of the denoiser (``Models.compile``): its compile time and the UNet step it gives, against our
eager UNet and diffusers' (optionally compiled too), same random weights, one process.

The first compiled call's time minus an eager call's is reported as the compile time (inductor's code cache in
/tmp/torchinductor_<user> makes a second process's compile shorter; delete it for a cold figure).

    python benchmarks/compile_step.py --model sd15 --sizes 32 --dtypes fp32 bf16
    python benchmarks/compile_step.py --freeze                  # weights folded as constants (inference only)
    python benchmarks/compile_step.py --reference-compile       # diffusers' UNet compiled as well
    python benchmarks/compile_step.py --tiny                    # a minutes-long smoke run
"""

from __future__ import annotations

import time

import torch
from common import DTYPES, arguments, race, start
from unet_step import CONFIGS, TINY_UNET, build


def one_size(ours, ref, config: dict, size: int, dtype_name: str, args, sync) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, size, size, generator=gen).to(args.device, dtype)
    t = torch.full((args.batch,), 500.0, device=args.device)
    ctx = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=gen).to(args.device, dtype)
    with torch.inference_mode():
        ours(x, t, ctx)
        began = time.perf_counter()
        eager = ours(x, t, ctx)
        eager_s = time.perf_counter() - began
    torch.compiler.reset()
    ours.compile(options={"freezing": True} if args.freeze else None)
    with torch.inference_mode():
        began = time.perf_counter()
        compiled = ours(x, t, ctx)
        first_s = time.perf_counter() - began
    err = float((compiled.float() - eager.float()).norm() / eager.float().norm())
    print(f"{dtype_name} latent {size}: eager call {eager_s:.3f} s, first compiled call {first_s:.1f} s "
          f"(compile ~{first_s - eager_s:.1f} s), compiled vs eager rel. error {err:.1e}", flush=True)
    if args.reference_compile:
        ref.compile()
    r = race(lambda: ours(x, t, ctx), lambda: ref(x, t, ctx).sample, args.repeats, sync)
    label = "diffusers compiled" if args.reference_compile else "diffusers eager"
    print(f"  compiled ours {r.ours_wall:.3f} s vs {label} {r.ref_wall:.3f} s: ratio {r.ratio:.2f} "
          f"(cpu {r.ours_cpu:.2f} / {r.ref_cpu:.2f}), rel. error {r.rel_err:.1e}; "
          f"vs our eager call {r.ours_wall / eager_s:.2f}", flush=True)
    ours._compiled_call_impl = None  # back to eager for the next size
    ref._compiled_call_impl = None


def main() -> None:
    parser = arguments(__doc__, dtypes=("fp32",), repeats=3, tiny="a tiny UNet (smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="latent sizes (image / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", default="sd15", choices=list(CONFIGS))
    parser.add_argument("--freeze", action="store_true", help="inductor freezing (weights as constants)")
    parser.add_argument("--reference-compile", action="store_true", help="compile diffusers' UNet too")
    args = parser.parse_args()
    sync = start(args)
    config = TINY_UNET if args.tiny else CONFIGS[args.model]
    for dtype_name in args.dtypes:
        ours, ref = build(config, DTYPES[dtype_name], args.device)
        for size in args.sizes:
            one_size(ours, ref, config, size, dtype_name, args, sync)


if __name__ == "__main__":
    main()
