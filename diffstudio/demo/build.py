"""Train the Shapes demo model ("shapes-sd") from scratch with diffstudio's own trainer.

It is a Stable Diffusion 1.x model in every structural respect (LDM UNet with conv
proj_in and 8 heads, LDM VAE with 8x downscale and 4 latent channels, a CLIP text
encoder on the real CLIP vocabulary), only tiny. So `diffstudio.detect` calls it "sd15"
and every SD 1.x code path runs on it.

Reproduce the shipped weights (about an hour on 2 CPU cores):

    python -m diffstudio.demo train --workdir runs/shapes --out diffstudio/demo/weights/shapes-sd.safetensors

The run checkpoints into --workdir and resumes if killed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from diffstudio.families.sd15 import SD15

# --- the architecture: SD 1.x conventions at a tiny width -----------------------------------------


def demo_configs():
    from transformers import CLIPTextConfig

    from diffstudio.models.unet import UNetConfig
    from diffstudio.models.vae import VAEConfig

    vae = VAEConfig(latent_channels=4, base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                      transformer_depth=(1, 1, 0), transformer_depth_middle=1, context_dim=64, num_heads=8,
                      num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None)
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return vae, unet, clip


# --- data ------------------------------------------------------------------------------------------


def render_dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The Shapes world as uint8 tensors (N, 3, H, W) and captions."""
    from diffstudio.demo.shapes import ShapesDataset

    data = ShapesDataset(n, size=size, seed=seed)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    captions = []
    for i in range(n):
        image, text = data[i]
        images[i] = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        captions.append(text)
    return images, captions


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


# --- stage 1: the VAE ------------------------------------------------------------------------------


def train_vae(vae, images_u8, *, steps: int, batch: int, workdir: Path, seed: int, lr: float = 4e-4):
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator, train
    from diffstudio.train.objectives import vae_loss

    def loss_fn(model, step):
        idx = batch_indices(len(images_u8), batch, step, seed)
        return vae_loss(model, to_unit(images_u8[idx]), step_generator(seed, step))

    return train(vae, loss_fn, steps=steps, out_dir=workdir / "vae", lr=lr, warmup=200, desc="vae",
                 checkpoint_every=250)


@torch.no_grad()
def rescale_latents(vae, images_u8, scale: float, n: int = 2000) -> float:
    """Reparametrise the VAE so that latent_mean * scale has unit std (SD's 0.18215 convention).

    The mean rows of quant_conv are multiplied by k, the log-variance bias moves by 2 ln k,
    and post_quant_conv's input columns are divided by k: the autoencoder computes the same
    function, only its latent space is stretched.
    """
    means = torch.cat([vae.encode(to_unit(images_u8[i:i + 200])) for i in range(0, min(n, len(images_u8)), 200)])
    k = 1.0 / (scale * means.std().item())
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


# --- stage 2: UNet + text encoder on cached latents ---------------------------------------------------


class DemoDenoiser(torch.nn.Module):
    """UNet and text encoder trained jointly; `forward` is the SD 1.x conditioning path."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x, t, input_ids):
        context = self.text_encoder(input_ids=input_ids).last_hidden_state
        return self.unet(x, t, context)


def tokenize_all(captions: list[str]) -> torch.Tensor:
    from diffstudio.conditioning.tokenizers import load_clip_tokenizer

    tok = load_clip_tokenizer()
    return torch.tensor(tok(captions, padding="max_length", max_length=77, truncation=True).input_ids)


def train_denoiser(model: DemoDenoiser, latents, ids, empty_ids, *, steps, batch, workdir: Path, seed: int,
                   lr: float = 5e-4, drop_caption: float = 0.1):
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator, train
    from diffstudio.train.objectives import alphas_cumprod, diffusion_loss

    acp = alphas_cumprod(SD15)

    def loss_fn(net, step):
        gen = step_generator(seed, step)
        idx = batch_indices(len(latents), batch, step, seed)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        dropped = torch.rand(len(idx), generator=gen) < drop_caption  # unconditional training for CFG
        batch_ids[dropped] = empty_ids
        return diffusion_loss(SD15, lambda x, t: net(x, t, batch_ids), x0, {}, gen, acp=acp)

    return train(model, loss_fn, steps=steps, out_dir=workdir / "unet", lr=lr, warmup=500, desc="unet",
                 checkpoint_every=500)


# --- the whole recipe ----------------------------------------------------------------------------------


def build(out: str | Path, workdir: str | Path = "runs/shapes", *, n_images: int = 30000, size: int = 64,
          vae_steps: int = 3000, unet_steps: int = 30000, vae_batch: int = 32, unet_batch: int = 128,
          seed: int = 0) -> Path:
    from diffstudio.convert.clip import build_clip_text_model
    from diffstudio.loader import Models
    from diffstudio.models.unet import UNetModel
    from diffstudio.models.vae import AutoencoderKL
    from diffstudio.save import save_single_file

    torch.manual_seed(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vae_cfg, unet_cfg, clip_cfg = demo_configs()
    started = time.time()
    images, captions = render_dataset(n_images, size, seed)

    vae = AutoencoderKL(vae_cfg)
    vae_losses = train_vae(vae, images, steps=vae_steps, batch=vae_batch, workdir=workdir, seed=seed)
    k = rescale_latents(vae, images, SD15.latent.scale)
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(images[i:i + 256])) for i in range(0, len(images), 256)])
        latents = SD15.latent.to_model(latents)

    ids = tokenize_all(captions)
    empty = tokenize_all([""])[0]
    model = DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
    unet_losses = train_denoiser(model, latents, ids, empty, steps=unet_steps, batch=unet_batch,
                                 workdir=workdir, seed=seed)

    models = Models(SD15, {"unet": model.unet, "vae": vae, "text_encoder": model.text_encoder},
                    {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": clip_cfg})
    recipe = {"n_images": n_images, "size": size, "vae_steps": vae_steps, "unet_steps": unet_steps,
              "vae_batch": vae_batch, "unet_batch": unet_batch, "seed": seed, "latent_rescale": k,
              "final_vae_loss": sum(vae_losses[-100:]) / 100, "final_unet_loss": sum(unet_losses[-100:]) / 100,
              "minutes": round((time.time() - started) / 60, 1)}
    path = save_single_file(models, out, dtype=torch.float16,
                            extra_metadata={"diffstudio.training": json.dumps(recipe),
                                            "modelspec.title": "shapes-sd (diffstudio demo)"})
    (workdir / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return path
