# Which kind does the model draw for each asked kind? The evaluation's prompts and seeds (evaluate.py), the
# scorer's reading of each image (docs/shapes.md, "Session 7"). MODEL: a file, or "shipped".
#   python experiments/shapes/kind_confusion.py runs/build10/shapes-sd.safetensors 120 [FIRST_SEED] [CFG]
import collections
import sys

import diffstudio
from diffstudio.demo.evaluate import single_shape_prompts
from diffstudio.demo.score import score_prompt

path, pairs = sys.argv[1], int(sys.argv[2])
first_seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
cfg = float(sys.argv[4]) if len(sys.argv) > 4 else None
pipe = diffstudio.Pipeline(diffstudio.load() if path == "shipped" else diffstudio.load(path))
drawn = collections.defaultdict(collections.Counter)
for i, (prompt, spec) in enumerate(single_shape_prompts(pairs)):
    result = score_prompt(pipe(prompt, seed=first_seed + i, cfg_scale=cfg, progress=False)[0], prompt)
    shapes = result["detected"]
    drawn[spec.kind][spec.kind if result["kind_ok"] else shapes[0].kind if shapes else "nothing"] += 1
for kind, counts in sorted(drawn.items()):
    print(f"{kind:9s} asked {sum(counts.values()):3d}: " + ", ".join(f"{k} {n}" for k, n in counts.most_common()))
