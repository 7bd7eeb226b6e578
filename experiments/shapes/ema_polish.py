# The build's own polish stage again (build(stages=("polish",)) in OUT, from WORKDIR's layout stage, with the
# recipe's captions, seed, rates and the given optimizer), keeping an exponential moving average of the weights
# beside it; scores the EMA weights with WORKDIR's decoder and checks that the raw run repeats WORKDIR's own
# polish checkpoint (docs/shapes.md, "Session 6").
# python experiments/shapes/ema_polish.py WORKDIR OUT [DECAY] [OPTIMIZER] [STEPS]
import json
import sys
from pathlib import Path

import torch
from stages import load_stage

from diffstudio.demo import build as B
from diffstudio.demo.evaluate import evaluate
from diffstudio.train import loop

workdir, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
decay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.998
optimizer = sys.argv[4] if len(sys.argv) > 4 else "adamw_fused"
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 1800  # the recipe's polish steps
out.mkdir(parents=True, exist_ok=True)
for name in ("dataset-20000-64-0.pt", "latents.pt", "layout"):
    if not (out / name).exists():
        (out / name).symlink_to(workdir / name)
ema = {}
real_train = loop.train


def train_with_ema(net, loss_fn, **kwargs):
    def loss_then_average(model, step):  # runs before step `step`'s update: average what the last one made
        d = min(decay, (1 + step) / (10 + step))  # the usual warm-up of the decay
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k not in ema or not v.is_floating_point():
                    ema[k] = v.detach().clone()
                else:
                    ema[k].lerp_(v, 1 - d)
        return loss_fn(model, step)
    return real_train(net, loss_then_average, **kwargs)


loop.train = train_with_ema
B.build(out / "unused.safetensors", out, polish_steps=steps, optimizer=optimizer, stages=("polish",))
raw, built = B._checkpoint_model(out / "polish"), B._checkpoint_model(workdir / "polish")
same = all(torch.equal(v, built[k]) for k, v in raw.items())
(out / "ema" / "checkpoint").mkdir(parents=True, exist_ok=True)
torch.save({"model": ema}, out / "ema" / "checkpoint" / "state.pt")
models = load_stage(workdir, "polish", stage_dir=out / "ema")
print(json.dumps({"raw_equals_build_polish": same, "decay": decay, "ema": evaluate(models, 120, progress=False)}))
