# Does the autoencoder keep a shape's kind? 200 single shapes (the evaluation's prompts, sizes drawn at random)
# rendered by the world, passed through a VAE (encode -> decode), read back by the scorer; kind accuracy per kind.
# SOURCE: a model file, or a build folder's stage with a checkpoint (runs/shapes/vae, runs/shapes/decoder).
#   python tools/shapes/vae_recon.py diffstudio/demo/weights/shapes-sd.safetensors runs/shapes/vae
import collections
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffstudio
from diffstudio.demo import build as B
from diffstudio.demo.evaluate import single_shape_prompts
from diffstudio.demo.score import score_prompt
from diffstudio.demo.shapes import SIZE_RADII, Scene, render
from diffstudio.models.vae import AutoencoderKL


def load_vae(source: str) -> AutoencoderKL:
    if Path(source).is_dir():
        vae = AutoencoderKL(B.demo_configs()[0])
        vae.load_state_dict(B._checkpoint_model(Path(source)))
        return vae.eval()
    return diffstudio.load(source).components["vae"].float().eval()


@torch.no_grad()
def kinds_kept(vae: AutoencoderKL, n: int = 200) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    kept, total = collections.Counter(), collections.Counter()
    for prompt, spec in single_shape_prompts(n, seed=777):
        image = render(Scene(shapes=(replace(spec, size=str(rng.choice(sorted(SIZE_RADII)))),)), 64)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        y = vae(x).clamp(-1, 1)[0].permute(1, 2, 0)
        back = Image.fromarray(((y + 1) * 127.5).round().byte().numpy())
        total[spec.kind] += 1
        kept[spec.kind] += bool(score_prompt(back, prompt)["kind_ok"])
    return {kind: (kept[kind], total[kind]) for kind in sorted(total)}


if __name__ == "__main__":
    for source in sys.argv[1:]:
        counts = kinds_kept(load_vae(source))
        share = sum(k for k, _ in counts.values()) / sum(t for _, t in counts.values())
        print(source, {kind: f"{k}/{t}" for kind, (k, t) in counts.items()}, f"all {share:.3f}")
