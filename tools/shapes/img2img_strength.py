# img2img on the demo model: a red circle in the centre as the input, 12 seeds per strength, once with a prompt
# that describes it and once with a prompt that contradicts it. Prints, per strength, how many images keep the
# input's colour and how many the scorer reads as the contradicting prompt's colour, and the worst PSNR of the
# described prompt's images against the input.
#   python tools/shapes/img2img_strength.py [MODEL]   (default: the packaged demo model)
import sys

import numpy as np

import diffstudio
from diffstudio.demo.score import score_prompt
from diffstudio.demo.shapes import Scene, ShapeSpec, render

pipe = diffstudio.Pipeline(diffstudio.load(*sys.argv[1:2]))
init = render(Scene((ShapeSpec("circle", "red", "center"),), ("white",)), size=64)
same, other = "a red circle in the center, white background", "a blue circle in the center, white background"


def psnr(image) -> float:
    error = np.mean((np.asarray(image, dtype=np.float64) - np.asarray(init, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


for strength in (0.1, 0.2, 0.3, 0.5):
    kept = [pipe(same, init_image=init, strength=strength, seed=s, progress=False)[0] for s in range(12)]
    recoloured = [pipe(other, init_image=init, strength=strength, seed=s, progress=False)[0] for s in range(12)]
    print(f"strength {strength}: described prompt {sum(bool(score_prompt(k, same)['all_ok']) for k in kept)}/12 "
          f"(worst PSNR {min(psnr(k) for k in kept):.1f} dB); contradicting prompt: blue "
          f"{sum(bool(score_prompt(r, other)['color_ok']) for r in recoloured)}/12, still red "
          f"{sum(bool(score_prompt(r, same)['color_ok']) for r in recoloured)}/12", flush=True)
