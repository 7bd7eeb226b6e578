# The costs around the training steps (docs/shapes.md, "Session 5", "Made faster"): sampling 20,000 scenes with
# the overlap test as it was (PIL's rank filter) and as it is, rendering the dataset, one stage's captions and
# tokens, and one AdamW step of the demo denoiser per-tensor against fused.
#   python experiments/shapes/overheads.py
import time
from unittest import mock

import numpy as np
import torch
from PIL import ImageFilter

from diffstudio.convert.clip import build_clip_text_model
from diffstudio.demo import build as B
from diffstudio.demo import shapes
from diffstudio.models.unet import UNetModel


def rank_filter_apart(a, b, gap=shapes.SHAPE_GAP):  # the overlap test before session 5
    grown = np.asarray(shapes._mask(a).filter(ImageFilter.MaxFilter(2 * int(round(gap * 128)) + 1))) > 0
    return not np.any(grown & (np.asarray(shapes._mask(b)) > 0))


def seconds(fn):
    started = time.time()
    fn()
    return time.time() - started


data = shapes.ShapesDataset(20000, seed=0)
print(f"20,000 scenes, separable dilation: {seconds(lambda: [data.scene(i) for i in range(20000)]):.1f} s")
with mock.patch.object(shapes, "shapes_apart", rank_filter_apart):
    print(f"20,000 scenes, PIL rank filter: {seconds(lambda: [data.scene(i) for i in range(20000)]):.1f} s")
print(f"render the dataset: {seconds(lambda: B.render_dataset(20000, 64, 0)):.1f} s")
print(f"a stage's captions + tokens: "
      f"{seconds(lambda: B.tokenize_all(B.stage_captions(20000, 64, 0, always_position=True))):.1f} s")

_, unet_cfg, clip_cfg = B.demo_configs()
model = B.DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
for p in model.parameters():
    p.grad = torch.randn_like(p)
for name, kwargs in (("per-tensor", {}), ("fused", {"fused": True})):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **kwargs)
    opt.step()
    print(f"AdamW step, {name}: {seconds(lambda o=opt: [o.step() for _ in range(30)]) / 30 * 1000:.1f} ms")
