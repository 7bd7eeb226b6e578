# Samplers x guidance scale on "a red circle in the center, white background": how many of 12 seeds the
# scorer reads right. python tools/shapes/cfg_sweep.py [MODEL]   (default: the packaged demo model)
import sys

import diffstudio
from diffstudio.demo.score import score_prompt

pipe = diffstudio.Pipeline(diffstudio.load(*sys.argv[1:2]))
prompt = "a red circle in the center, white background"
for cfg in [2.0, 3.0, 4.0, 5.0, 7.0]:
    row = {}
    for sampler, steps in [("dpmpp_2m_sde", 20), ("euler", 20), ("dpmpp_2m", 15)]:
        images = [pipe(prompt, seed=s, sampler=sampler, steps=steps, cfg_scale=cfg, progress=False)[0]
                  for s in range(12)]
        row[sampler] = sum(bool(score_prompt(image, prompt)["all_ok"]) for image in images)
    print(f"CFG {cfg}: {row}", flush=True)
