"""Train the Shapes demo model ("shapes-sd") from scratch with diffstudio's own trainer.

It is a Stable Diffusion 1.x model in every structural respect (LDM UNet with conv
proj_in and 8 heads, LDM VAE with 8x downscale and 4 latent channels, a CLIP text
encoder on the real CLIP vocabulary), only tiny. So `diffstudio.detect` calls it "sd15"
and every SD 1.x code path runs on it.

Reproduce the shipped weights (two threads, the machine otherwise idle: 79.5 minutes, peak memory 1.5 GB;
docs/shapes.md gives the stages' times and the scores):

    python -m diffstudio.demo train --workdir runs/shapes --out diffstudio/demo/weights/shapes-sd.safetensors

Runs with the same thread count repeat themselves bit for bit; another thread count sums in another order and
trains a slightly different model.

Stages, run in this order (each checkpoints into --workdir and resumes if killed; `--stage` runs one):
1. `vae`: the autoencoder, encoder and decoder together, on full 64x64 images;
2. `latents`: rescale the latent space to SD's 0.18215 convention, encode the dataset;
3. `unet`: UNet and text encoder from scratch on the cached latents;
4. `layout`: the x0 error at high noise on captions that name positions (see `layout_loss`);
5. `polish`: plain eps again at a low rate, giving back the shape detail `layout` cost;
6. `refine`: the phrasing people write ("a red circle on a white background");
7. `decoder`: the decoder alone, encoder frozen (the latent space does not move, so this
   stage may also run beside the denoiser stages, like SD's fine-tuned "ft-MSE" decoders; 0 steps skip it);
8. `assemble`: one SD 1.x single file (fp16) with its configs and generation defaults in the metadata.
"""

from __future__ import annotations

import functools
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

    # 8 norm groups (4 channels each): with SD's 32 groups at this width every group would be a single
    # channel, an instance norm that erases each channel's mean - the colour of a flat image.
    vae = VAEConfig(latent_channels=4, block_out_channels=(32, 64, 64, 64), num_res_blocks=1, norm_groups=8)
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


def train_vae(vae, images_u8, *, steps: int, batch: int, out_dir: Path, seed: int, lr: float = 2e-4,
              decoder_only: bool = False, optimizer: str = "adamw", edge_weight: float = 0.0):
    """Autoencoder training (L1 + L2 + tiny KL; ``edge_weight``: objectives.vae_loss). With decoder_only, the
    encoder (and so the latent space) is frozen and only the decoder learns."""
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator, train
    from diffstudio.train.objectives import vae_loss

    if decoder_only:
        for name, p in vae.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))

    def loss_fn(model, step):
        gen = step_generator(seed, step)
        idx = batch_indices(len(images_u8), batch, step, seed)
        return vae_loss(model, to_unit(images_u8[idx]), gen, chroma_weight=4.0, edge_weight=edge_weight)

    return train(vae, loss_fn, steps=steps, out_dir=out_dir, lr=lr, warmup=100, optimizer=optimizer,
                 desc="decoder" if decoder_only else "vae", checkpoint_every=100)


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


# --- stage 3: UNet + text encoder on cached latents ---------------------------------------------------


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


def stage_captions(n: int, size: int, seed: int, *, always_position: bool = False,
                   on_background: float = 0.0) -> list[str]:
    """The dataset's captions again, restyled for a later stage: ``always_position`` names every shape's
    position; ``on_background`` is the share written "... on a white background" (how people phrase
    prompts) instead of the dataset's "..., white background". The phrasing draws come from their own
    random stream, so the dataset and the other parts of each caption stay as they were."""
    from dataclasses import replace

    import numpy as np

    from diffstudio.demo.shapes import ShapesDataset, caption

    data = ShapesDataset(n, size=size, seed=seed)
    phrasing = np.random.default_rng([seed, 4242]).random(n) < on_background
    return [caption(scene, replace(style, position=style.position or always_position, on_background=bool(on)))
            for (scene, style), on in zip(map(data.scene, range(n)), phrasing)]


def layout_loss(net, x0, ids, gen, prediction, t_low: int) -> torch.Tensor:
    """x0-space error at high noise (t >= t_low), where the layout of the picture is decided.

    With SD's schedule the noisiest training input still carries sqrt(abar_999) = 0.07 of the image,
    enough for a network to read where the shapes are from x_t instead of from the text; and the eps
    objective weights x0 errors there by SNR(t) < 0.05, so it barely asks for text-driven layout. At
    sampling time the first input is pure noise, so such a model places shapes where the seed's noise
    suggests, whatever the prompt says (after the unet stage alone, position accuracy is near chance:
    docs/shapes.md).
    Penalising ||x0_pred - x0||^2 at t >= t_low asks the network to put the shape where the caption
    says when x_t cannot tell it. x0_pred is the eps prediction read back through the schedule, so the
    network stays an ordinary eps-prediction SD 1.x UNet.
    """
    import torch.nn.functional as F

    t = prediction.training_levels(x0.shape[0], gen, low=t_low)  # (levels first, then the noise)
    noise = torch.randn(x0.shape, generator=gen)
    x_t, timestep = prediction.training_input(x0, noise, t)
    return F.mse_loss(prediction.training_x0(x_t, t, net(x_t, timestep, ids)), x0)


def train_denoiser(model: DemoDenoiser, latents, ids, empty_ids, *, steps, batch, out_dir: Path, seed: int,
                   lr: float = 1e-3, lr_end: float | None = None, drop_caption: float = 0.1, layout_t: int = 0,
                   layout_share: float = 0.5, layout_ids: torch.Tensor | None = None, warmup: int = 300,
                   snr_gamma: float | None = None, optimizer: str = "adamw"):
    """``layout_t`` > 0: a ``layout_share`` of each batch (half in the layout stage) trains ``layout_loss``
    at t >= layout_t, captioned by ``layout_ids`` (default: ``ids``). ``lr_end``: anneal to it (half
    cosine). ``snr_gamma``: Min-SNR weighting of the eps part (objectives.diffusion_loss). The stages'
    values are in `build` (docs/shapes.md, "Rebuilding it")."""
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator, train
    from diffstudio.train.objectives import diffusion_loss

    prediction = prediction_for(SD15)

    def loss_fn(net, step):
        gen = step_generator(seed, step)
        idx = batch_indices(len(latents), batch, step, seed)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(len(idx), generator=gen) < drop_caption  # unconditional training for CFG
        half = len(idx) - round(len(idx) * layout_share)
        if layout_t and layout_ids is not None:
            batch_ids[half:] = layout_ids[idx[half:]]
        batch_ids[dropped] = empty_ids
        if not layout_t or half == len(idx):  # (a small batch may round the layout part to nothing)
            return diffusion_loss(prediction, lambda x, t: net(x, t, batch_ids), latents[idx], {}, gen,
                                  snr_gamma=snr_gamma)
        eps_part = diffusion_loss(prediction, lambda x, t: net(x, t, batch_ids[:half]), latents[idx[:half]], {},
                                  gen, snr_gamma=snr_gamma)
        return eps_part + layout_loss(net, latents[idx[half:]], batch_ids[half:], gen, prediction, layout_t)

    return train(model, loss_fn, steps=steps, out_dir=out_dir, lr=lr, lr_end=lr_end, warmup=warmup,
                 optimizer=optimizer, desc=out_dir.name, checkpoint_every=250)


# --- the whole recipe ----------------------------------------------------------------------------------

STAGES = ("vae", "latents", "unet", "decoder", "layout", "polish", "refine", "assemble")


def _checkpoint_model(out_dir: Path) -> dict:
    from diffstudio.train.loop import CHECKPOINT

    return torch.load(out_dir / CHECKPOINT / "state.pt", map_location="cpu", weights_only=True)["model"]


def build(out: str | Path, workdir: str | Path = "runs/shapes", *, n_images: int = 20000, size: int = 64,
          vae_steps: int = 3000, decoder_steps: int = 2000, unet_steps: int = 5000, layout_steps: int = 2500,
          polish_steps: int = 1800, refine_steps: int = 2000, vae_batch: int = 8, vae_edge_weight: float = 8.0,
          unet_batch: int = 32, unet_lr_end: float | None = 5e-5, optimizer: str = "adamw_fused", seed: int = 0,
          stages: tuple[str, ...] = STAGES) -> Path | None:
    from diffstudio.convert.clip import build_clip_text_model
    from diffstudio.loader import Models
    from diffstudio.models.unet import UNetModel
    from diffstudio.models.vae import AutoencoderKL
    from diffstudio.save import save_single_file

    torch.manual_seed(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vae_cfg, unet_cfg, clip_cfg = demo_configs()

    @functools.cache
    def dataset() -> tuple[torch.Tensor, list[str]]:
        """(images, captions), rendered once into the work folder; read only by the stages that need them
        (an `assemble` alone never touches the 250 MB cache)."""
        cache = workdir / f"dataset-{n_images}-{size}-{seed}.pt"
        if cache.exists():
            return tuple(torch.load(cache, weights_only=True).values())
        images, captions = render_dataset(n_images, size, seed)
        torch.save({"images": images, "captions": captions}, cache)
        return images, captions

    recipe_path = workdir / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.exists() else {}
    recipe.update({"n_images": n_images, "size": size, "vae_steps": vae_steps, "decoder_steps": decoder_steps,
                   "unet_steps": unet_steps, "layout_steps": layout_steps, "polish_steps": polish_steps,
                   "refine_steps": refine_steps,
                   "vae_batch": vae_batch, "unet_batch": unet_batch, "unet_lr_end": unet_lr_end,
                   "optimizer": optimizer, "vae_edge_weight": vae_edge_weight, "seed": seed})

    if "vae" in stages:
        started = time.time()
        vae = AutoencoderKL(vae_cfg)
        with torch.no_grad():  # start from a near-deterministic posterior (std e^-4): the decoder first
            vae.quant_conv.bias[vae_cfg.latent_channels:] = -8.0  # sees signal, not unit noise
        losses = train_vae(vae, dataset()[0], steps=vae_steps, batch=vae_batch, out_dir=workdir / "vae", seed=seed,
                           optimizer=optimizer, edge_weight=vae_edge_weight)
        recipe["vae_loss"] = sum(losses[-50:]) / len(losses[-50:])
        recipe["vae_minutes"] = round((time.time() - started) / 60, 1)
    if "latents" in stages:
        vae = AutoencoderKL(vae_cfg)
        vae.load_state_dict(_checkpoint_model(workdir / "vae"))
        vae.eval()
        images = dataset()[0]
        recipe["latent_rescale"] = rescale_latents(vae, images, SD15.latent.scale)
        with torch.no_grad():
            latents = torch.cat([vae.encode(to_unit(images[i:i + 256])) for i in range(0, len(images), 256)])
        torch.save({"vae": vae.state_dict(), "latents": SD15.latent.to_model(latents)}, workdir / "latents.pt")
    def denoiser_stage(name: str, texts: list[str], start_from: str | None, **train_kwargs) -> None:
        """Train UNet + text encoder (from scratch, or from stage ``start_from``'s checkpoint) into ``name``."""
        started = time.time()
        latents = torch.load(workdir / "latents.pt", weights_only=True)["latents"]
        torch.manual_seed(seed)  # the initial weights depend on the seed only, not on the stages run before
        model = DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
        if start_from:
            model.load_state_dict(_checkpoint_model(workdir / start_from))
        losses = train_denoiser(model, latents, tokenize_all(texts), tokenize_all([""])[0],
                                batch=unet_batch, out_dir=workdir / name, optimizer=optimizer, **train_kwargs)
        recipe[f"{name}_loss"] = sum(losses[-100:]) / len(losses[-100:])
        recipe[f"{name}_minutes"] = round((time.time() - started) / 60, 1)

    if "unet" in stages:
        denoiser_stage("unet", dataset()[1], None, steps=unet_steps, seed=seed, lr_end=unet_lr_end)
    if "layout" in stages:
        # The unet stage learns colour and kind but not where a shape goes (docs/shapes.md: position 0.26
        # after it, chance 0.2; see layout_loss for why). Go on with captions that
        # always name the position, half of each batch on the x0 error at high noise.
        denoiser_stage("layout", stage_captions(n_images, size, seed, always_position=True), "unet", steps=layout_steps,
                       seed=seed + 2, lr=5e-4, layout_t=700, warmup=50)
    if "polish" in stages:
        # The layout stage's x0 term trades some shape detail (kind accuracy 0.83 -> 0.52) for position
        # (0.26 -> 1.0). A plain-eps run at a low learning rate gives the detail back: the eps
        # objective weighs the low-noise steps where edges form, and barely touches the high-noise
        # behaviour that places the shapes.
        denoiser_stage("polish", stage_captions(n_images, size, seed, always_position=True), "layout",
                       steps=polish_steps, seed=seed + 3, lr=2e-4, warmup=20)
    if "refine" in stages:
        # Teach the prompts people write, at an annealed rate (docs/shapes.md, "Rebuilding it"): half of the
        # backgrounds phrased "on a white background". The dataset says ", white background", and "on" alone
        # reads as "on the left/right" to a model that never saw the other phrasing (two shapes, one on the
        # right). Captions keep naming positions (with the dataset's 20% without, region prompts in
        # attention mode lost their sides); Min-SNR-5 weighting of the eps part; 4 of 32 samples keep the
        # layout term.
        phrased = stage_captions(n_images, size, seed, always_position=True, on_background=0.5)
        denoiser_stage("refine", phrased, "polish", steps=refine_steps, seed=seed + 4, lr=2e-4, lr_end=1e-5,
                       warmup=20, snr_gamma=5.0, layout_t=700, layout_share=0.125)
    if "decoder" in stages and decoder_steps:  # 0 steps: assemble keeps the VAE stage's decoder
        started = time.time()
        vae = AutoencoderKL(vae_cfg)
        vae.load_state_dict(torch.load(workdir / "latents.pt", weights_only=True)["vae"])
        losses = train_vae(vae, dataset()[0], steps=decoder_steps, batch=vae_batch, out_dir=workdir / "decoder",
                           seed=seed + 1, lr=1e-4, decoder_only=True, optimizer=optimizer, edge_weight=vae_edge_weight)
        recipe["decoder_loss"] = sum(losses[-50:]) / len(losses[-50:])
        recipe["decoder_minutes"] = round((time.time() - started) / 60, 1)
    # stages may run side by side (unet beside decoder): merge with what the other wrote meanwhile
    recipe = {**(json.loads(recipe_path.read_text()) if recipe_path.exists() else {}), **recipe}
    recipe_path.write_text(json.dumps(recipe, indent=1))
    if "assemble" not in stages:
        return None
    vae = AutoencoderKL(vae_cfg)
    decoder_dir = workdir / "decoder"
    vae.load_state_dict(_checkpoint_model(decoder_dir) if decoder_steps and (decoder_dir / "checkpoint").exists()
                        else torch.load(workdir / "latents.pt", weights_only=True)["vae"])
    model = DemoDenoiser(UNetModel(unet_cfg), build_clip_text_model(clip_cfg))
    denoiser_dir = next(workdir / d for d in ("refine", "polish", "layout", "unet")
                        if (workdir / d / "checkpoint").exists())
    model.load_state_dict(_checkpoint_model(denoiser_dir))
    from diffstudio.demo.untrained import DEMO_DEFAULTS

    models = Models(SD15, {"unet": model.unet, "vae": vae, "text_encoder": model.text_encoder},
                    {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": clip_cfg}, defaults=DEMO_DEFAULTS)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(models, out, dtype=torch.float16,
                            extra_metadata={"diffstudio.training": json.dumps(recipe),
                                            "modelspec.title": "shapes-sd (diffstudio demo)"})
