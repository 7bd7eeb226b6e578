# Why DPM++ 2M SDE failed at CFG 5 (docs/shapes.md, "Session 4"): the guided denoiser's gain along the
# red -> yellow direction of the latent space, for a red circle plus noise at a few noise levels.
# A gain g means: move x_t by d along that direction and the guided x0 prediction moves by g * d.
# python experiments/shapes/cfg_gain.py [MODEL]
import sys

import torch

import diffstudio
from diffstudio.demo.shapes import Scene, ShapeSpec, render
from diffstudio.io.images import images_to_tensor
from diffstudio.pipeline.denoiser import make_denoiser

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
        print(f"sigma {sigma}: conditional {gain['cond']:.2f}, unconditional {gain['uncond']:.2f}, "
              f"CFG 3 {guided[3]:.2f}, CFG 5 {guided[5]:.2f}")
