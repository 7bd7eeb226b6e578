# Score a demo model beyond `evaluate`: the evaluation pairs, then 12 seeds each of three everyday prompts (what the
# scorer reads, and whether exactly one shape is drawn), and "a red circle in the center, white background" with
# every sampler at its usual steps. Prints one JSON report.
#   python tools/shapes/eval_variant.py MODEL.safetensors|WORKDIR [PAIRS] [SEEDS] [CFG]
# WORKDIR: a `python -m diffstudio.demo train` work folder, assembled from its latest stage first.
import json
import sys
import time
from pathlib import Path

import diffstudio
from diffstudio.demo.build import build
from diffstudio.demo.evaluate import USUAL_STEPS, evaluate
from diffstudio.demo.score import score_prompt

target = Path(sys.argv[1])
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 120
seeds = range(int(sys.argv[3]) if len(sys.argv) > 3 else 12)
if target.suffix == ".safetensors":
    out = target
else:
    out = target / "model.safetensors"
    build(out, target, stages=("assemble",))
models = diffstudio.load(out)
if len(sys.argv) > 4:  # another guidance scale than the model's default
    models.defaults = {**models.defaults, "cfg_scale": float(sys.argv[4])}
t0 = time.time()
report = {"eval": evaluate(models, pairs, progress=False)}
pipe = diffstudio.Pipeline(models)
for prompt in ["a red circle on a white background", "a blue square", "a red circle in the center, white background"]:
    rs = [score_prompt(pipe(prompt, seed=s, progress=False)[0], prompt) for s in seeds]
    report[prompt] = {k: sum(bool(r[k]) for r in rs) for k in ("all_ok", "count_ok")}
    report[prompt]["both"] = sum(bool(r["all_ok"] and r["count_ok"]) for r in rs)
    report[prompt]["drawn"] = [" / ".join(f"{d.color} {d.kind} {d.position}" for d in r["detected"]) for r in rs]
prompt = "a red circle in the center, white background"
for sampler, steps in USUAL_STEPS.items():
    rs = [score_prompt(pipe(prompt, seed=s, sampler=sampler, steps=steps, progress=False)[0], prompt) for s in seeds]
    report[sampler] = sum(bool(r["all_ok"]) for r in rs)
report["minutes"] = (time.time() - t0) / 60
print(json.dumps(report, indent=1))
