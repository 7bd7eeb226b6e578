# The build's polish stage again (from WORKDIR/layout, same captions, seed, rates and optimizer), keeping an
# exponential moving average of the weights beside it; scores the EMA weights with the folder's decoder and
# checks that the raw run repeats the build's own polish checkpoint (docs/shapes.md, "Session 6").
# python experiments/shapes/ema_polish.py WORKDIR OUT [DECAY] [OPTIMIZER]
import json
import sys
import tempfile
from pathlib import Path

import torch

import diffstudio
from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.demo.evaluate import evaluate
from diffstudio.models.unet import UNetModel
from diffstudio.train import loop

workdir, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
decay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.998
optimizer = sys.argv[4] if len(sys.argv) > 4 else "adamw_fused"
_, unet_cfg, clip_cfg = B.demo_configs()
latents = torch.load(workdir / "latents.pt", weights_only=True)["latents"]
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
model.load_state_dict(B._checkpoint_model(workdir / "layout"))
ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
real_train = loop.train


def train_with_ema(net, loss_fn, **kwargs):
    def loss_then_average(m, step):  # runs before step `step`'s update: average the weights the last one made
        d = min(decay, (1 + step) / (10 + step))  # the usual warm-up of the decay
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - d) if v.is_floating_point() else ema[k].copy_(v)
        return loss_fn(m, step)
    return real_train(net, loss_then_average, **kwargs)


loop.train = train_with_ema
captions = B.stage_captions(20000, 64, 0, always_position=True)
B.train_denoiser(model, latents, B.tokenize_all(captions), B.tokenize_all([""])[0], steps=1800, batch=32,
                 out_dir=out / "raw", seed=3, lr=2e-4, warmup=20, optimizer=optimizer)
built = B._checkpoint_model(workdir / "polish")
same = all(torch.equal(v, built[k]) for k, v in model.state_dict().items())
(out / "polish" / "checkpoint").mkdir(parents=True, exist_ok=True)
torch.save({"model": ema}, out / "polish" / "checkpoint" / "state.pt")
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for name in ("latents.pt", "decoder"):
        (tmp / name).symlink_to(workdir / name)
    (tmp / "polish").symlink_to(out / "polish")
    B.build(tmp / "model.safetensors", tmp, stages=("assemble",))
    models = diffstudio.load(tmp / "model.safetensors")
print(json.dumps({"raw_equals_build_polish": same, "decay": decay, "ema": evaluate(models, 120, progress=False)}))
