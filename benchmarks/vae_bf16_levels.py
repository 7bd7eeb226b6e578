"""The VAE decode in bf16 against fp32, in 8-bit levels: the demo model on latents it samples, and the SD 1.5-size
random-weight single file of time_to_image.py (--keep folder) on a random latent. One thread."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
torch.set_num_threads(1)
import diffstudio  # noqa: E402
from diffstudio.pipeline.tiled_vae import decode  # noqa: E402


def levels(path, size, n):
    models = diffstudio.load(*([path] if path else []))
    vae = models.vae
    fam = models.family
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, size, size, generator=g)
    if not path:  # latents the demo model makes
        pipe = diffstudio.Pipeline(models)
        zs = []
        prompts = ["a red circle on the left", "a blue star at the top", "a green square in the center",
                   "a yellow triangle on the right"]
        for i, p in enumerate(prompts[:n]):
            _, lat = pipe.sample(diffstudio.Request(p, seed=i), progress=False)
            zs.append(lat)
        z = torch.cat(zs)
    with torch.inference_mode():
        ref = decode(vae, fam.latent.from_model(z), tiled=False).float()
        vae.to(torch.bfloat16)
        low = decode(vae, fam.latent.from_model(z).to(torch.bfloat16), tiled=False).float()
        vae.to(torch.float32)
    a, b = ((ref.clamp(-1, 1) + 1) / 2), ((low.clamp(-1, 1) + 1) / 2)
    err = (a - b).abs()
    q = ((a * 255).round() != (b * 255).round()).float().mean()
    print(f"{path or 'demo'} latent {tuple(z.shape)}: max abs {err.max() * 255:.2f} levels, mean abs "
          f"{err.mean() * 255:.3f} levels, 8-bit pixels changed {q:.3%}, load {os.getloadavg()[0]:.1f}", flush=True)
levels(None, 8, 4)
if len(sys.argv) > 1:  # the SD 1.5-size file written by time_to_image.py --keep
    levels(sys.argv[1], 32, 1)
