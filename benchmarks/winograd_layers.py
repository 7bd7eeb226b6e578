"""Single 3x3 convolutions: Winograd F(4x4, 3x3) (``models/winograd.py``, kernels transformed beforehand, as
``Models.winograd`` keeps them) against torch's direct ``F.conv2d``, same inputs, batch 2, alternating runs.

    python benchmarks/winograd_layers.py --threads 1           # the SD-size layers, fp32 and bf16
    python benchmarks/winograd_layers.py --layers 320,320,64 --dtypes fp32 --threads 2

The error column: relative L2 error of each against a float64 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import DTYPES, arguments, race, start

from diffstudio.models.winograd import transform_weight, winograd_conv3x3

LAYERS = ["320,320,64", "640,640,32", "1280,1280,16", "1280,1280,8", "512,512,128", "128,128,256"]


def main() -> None:
    parser = arguments(__doc__, repeats=3)
    parser.add_argument("--layers", nargs="+", default=LAYERS, help="IN,OUT,SIDE of each layer")
    args = parser.parse_args()
    sync = start(args)
    print(f"{'dtype':<6}{'layer':>16}{'direct ms':>11}{'winograd ms':>13}{'ratio':>7}{'err direct':>12}"
          f"{'err winograd':>14}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for layer in args.layers:
            cin, cout, side = (int(v) for v in layer.split(","))
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, cin, side, side, generator=gen)
            weight = torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin ** 0.5)
            exact = F.conv2d(x.double(), weight.double(), padding=1)
            x, weight = x.to(args.device, dtype), weight.to(args.device, dtype)
            kernels = transform_weight(weight.float()).to(dtype)
            with torch.inference_mode():
                r = race(lambda x=x, k=kernels: winograd_conv3x3(x, k),
                         lambda x=x, w=weight: F.conv2d(x, w, padding=1), args.repeats, sync)
                errors = [((y.double().cpu() - exact).norm() / exact.norm()).item()
                          for y in (F.conv2d(x, weight, padding=1), winograd_conv3x3(x, kernels))]
            print(f"{dtype_name:<6}{layer:>16}{r.ref_wall * 1e3:>11.1f}{r.ours_wall * 1e3:>13.1f}{r.ratio:>7.2f}"
                  f"{errors[0]:>12.1e}{errors[1]:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
