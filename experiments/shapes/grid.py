# A 4 prompts x 4 seeds grid. python experiments/shapes/grid.py MODEL OUT.png
import sys

from PIL import Image

import diffstudio

m = diffstudio.load(sys.argv[1])
pipe = diffstudio.Pipeline(m)
prompts = [
    "a red circle in the center, white background",
    "a blue square on the left, white background",
    "a yellow star at the top, black background",
    "a red circle on a white background",
]
tiles = [pipe(p, seed=s, progress=False)[0] for p in prompts for s in range(4)]
grid = Image.new("RGB", (64 * 4, 64 * 4))
for i, t in enumerate(tiles):
    grid.paste(t, ((i % 4) * 64, (i // 4) * 64))
grid.resize((384, 384), Image.NEAREST).save(sys.argv[2])
