# Region prompts on the demo model (docs/shapes.md, "Session 4"): tests/test_regions_shapes.py's check with
# 10 seeds per side: how many of 20 images put the red circle and the blue square in their halves.
# python experiments/shapes/regions_probe.py MODEL [CFG]
import sys

import diffstudio
from diffstudio import Region
from diffstudio.demo.score import dominant_color

pipe = diffstudio.Pipeline(diffstudio.load(sys.argv[1]))
cfg = float(sys.argv[2]) if len(sys.argv) > 2 else None
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
for mode in ["attention", "latent"]:
    hits = []
    for red_side, blue_side in ((LEFT, RIGHT), (RIGHT, LEFT)):
        red, blue = ("on the left", "on the right") if red_side == LEFT else ("on the right", "on the left")
        regions = [Region(f"a red circle {red}", box=red_side), Region(f"a blue square {blue}", box=blue_side)]
        for seed in range(10):
            image = pipe("a red circle and a blue square, white background", seed=seed, regions=regions,
                         region_mode=mode, cfg_scale=cfg, progress=False)[0]
            hits.append(dominant_color(image, region=red_side) == "red"
                        and dominant_color(image, region=blue_side) == "blue")
    print(f"{mode}: {sum(hits)} / {len(hits)}")
