# Why DPM++ 2M SDE failed at CFG 5 (docs/shapes.md, "Session 4"): the guided denoiser's gain along the
# red -> yellow direction of the latent space, for a red circle plus noise at a few noise levels.
# A gain g means: move x_t by d along that direction and the guided x0 prediction moves by g * d.
# Then the roots of the linearised DPM++ 2M step (ODE and SDE) for the guided gain at sigma 1.
# python experiments/shapes/cfg_gain.py [MODEL]
import math
import sys

import numpy as np
import torch

import diffstudio
from diffstudio.demo.shapes import Scene, ShapeSpec, render
from diffstudio.io.images import images_to_tensor
from diffstudio.pipeline.denoiser import make_denoiser
from diffstudio.sampling.schedules import get_sigmas

pipe = diffstudio.Pipeline(diffstudio.load(*sys.argv[1:2]))
denoiser = make_denoiser(pipe.models, (8, 8))


def latent(color: str) -> torch.Tensor:
    image = render(Scene((ShapeSpec("circle", color, "center"),), ("white",)), size=64)
    return pipe.encode_images(images_to_tensor([image]), False)


with torch.inference_mode():
    red, yellow = latent("red"), latent("yellow")
    v = (yellow - red) / (yellow - red).norm()
    cond, uncond = pipe.encode_prompts(["a red circle in the center, white background"] * 16, [""] * 16, 1)
    for sigma in [0.3, 1.0, 3.0]:
        x = red + sigma * torch.randn(16, *red.shape[1:], generator=torch.Generator().manual_seed(0))
        step, s = 0.05 * sigma, torch.full((16,), sigma)
        gain = {}
        for name, c in [("cond", cond), ("uncond", uncond)]:
            moved = denoiser(x + step * v, s, **c) - denoiser(x, s, **c)
            gain[name] = (moved * v).flatten(1).sum(1).mean().item() / step
        guided = {cfg: gain["uncond"] + cfg * (gain["cond"] - gain["uncond"]) for cfg in (3, 5)}
        if sigma == 1.0:
            at_one = guided
        print(f"sigma {sigma}: conditional {gain['cond']:.2f}, unconditional {gain['uncond']:.2f}, "
              f"CFG 3 {guided[3]:.2f}, CFG 5 {guided[5]:.2f}")

# A deviation d along v, one step of DPM++ 2M in VE form with h / h_prev ~ 1 (the midpoint correction):
# d' = (decay + w g) d + 0.5 w g (d - d_prev), with decay = e^-h, w = 1 - e^-h (ODE) or e^-2h, 1 - e^-2h (SDE).
# A root beyond -1 is an oscillation that grows.
sigmas = [float(x) for x in get_sigmas("normal", denoiser, 20)]
i = min(range(len(sigmas) - 2), key=lambda k: abs(sigmas[k] - 1.0))
h = math.log(sigmas[i] / sigmas[i + 1])
for cfg, g in at_one.items():
    for name, k in (("ODE", 1), ("SDE", 2)):
        decay, w = math.exp(-k * h), 1 - math.exp(-k * h)
        roots = np.roots([1, -(decay + 1.5 * w * g), 0.5 * w * g])
        print(f"CFG {cfg}, h {h:.2f}, DPM++ 2M {name}: roots {', '.join(f'{r:.2f}' for r in roots)}")
