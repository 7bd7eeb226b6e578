# The colour of each step's x0 prediction, decoded and read by the scorer (docs/shapes.md, "Session 4": with
# DPM++ 2M SDE at CFG 5 it alternated yellow / purple step after step).
# python experiments/shapes/x0_colours.py [MODEL] [SAMPLER] [CFG]
import sys

import diffstudio
from diffstudio.demo.score import read_image
from diffstudio.io.images import tensor_to_images

pipe = diffstudio.Pipeline(diffstudio.load(*sys.argv[1:2]))
sampler = sys.argv[2] if len(sys.argv) > 2 else "dpmpp_2m_sde"
cfg = float(sys.argv[3]) if len(sys.argv) > 3 else None
for seed in range(6):
    predictions = []
    pipe("a red circle in the center, white background", seed=seed, sampler=sampler, steps=20, cfg_scale=cfg,
         progress=False, callback=lambda i, total, x, denoised, kept=predictions: kept.append(denoised.clone()))
    colours = []
    for denoised in predictions:
        image = tensor_to_images(pipe.decode_latents(denoised, False))[0]
        colours.append("+".join(shape.color[:3] for shape in read_image(image)) or "-")
    print(seed, " ".join(colours))
