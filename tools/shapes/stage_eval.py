# Score every denoiser stage of a build folder (unet, layout, polish, refine), each with the folder's decoder,
# to see what each stage adds. python tools/shapes/stage_eval.py WORKDIR [PAIRS] [CFG]   -> one JSON line per stage
import json
import sys
from pathlib import Path

from stages import load_stage

from diffstudio.demo.evaluate import evaluate

workdir = Path(sys.argv[1]).resolve()
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 120
cfg = float(sys.argv[3]) if len(sys.argv) > 3 else None
for stage in ("unet", "layout", "polish", "refine"):
    if not (workdir / stage / "checkpoint").exists():
        continue
    models = load_stage(workdir, stage)
    if cfg is not None:
        models.defaults = {**models.defaults, "cfg_scale": cfg}
    print(json.dumps({"stage": stage, **evaluate(models, pairs, progress=False)}), flush=True)
