# Which kind does the model draw for each asked kind? The evaluation's own pairs (evaluate.scored_pairs), read by
# the scorer. MODEL: a file, or "shipped" for the packaged demo model.
#   python tools/shapes/kind_confusion.py shipped 120 [FIRST_SEED]
import collections
import sys

import diffstudio
from diffstudio.demo.evaluate import scored_pairs

path, pairs = sys.argv[1], int(sys.argv[2])
first_seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
models = diffstudio.load() if path == "shipped" else diffstudio.load(path)
drawn = collections.defaultdict(collections.Counter)
for spec, result in scored_pairs(models, pairs, seed=first_seed, progress=False):
    shapes = result["detected"]
    drawn[spec.kind][spec.kind if result["kind_ok"] else shapes[0].kind if shapes else "nothing"] += 1
for kind, counts in sorted(drawn.items()):
    print(f"{kind:9s} asked {sum(counts.values()):3d}: " + ", ".join(f"{k} {n}" for k, n in counts.most_common()))
