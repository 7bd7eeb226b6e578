"""LoRA training for CogVideoX (Yang et al. 2024, arXiv:2408.06072) on a folder of clips with captions.

``train.lora.train_lora`` hands CogVideoX models here (``Family.lora_trainer``); the adapters, the loop (exact
resume, data-parallel under ``accelerate launch``), the recipe check and the export are the image trainer's
(``train.lora.fit_and_export``). What differs is the data and the objective:

* **data**: each clip (``train.clips``: a video file or a folder of frames, captions in ``metadata.csv`` or a
  ``.txt`` beside it) gives its first ``frames`` frames (4k + 1: the causal 3D VAE compresses 4k + 1 frames into
  k + 1 latent frames), resized to cover ``width x height`` and centre-cropped. The frozen VAE encodes them once
  (posterior mean, times the VAE scaling factor, as sampling expects: (F, 16, H/8, W/8)) and the frozen T5-XXL
  encodes the caption once (226 tokens, (1, 226, 4096)); both are cached in ``<workdir>/cache.pt``.
* **objective**: v-prediction on the model's own zero-terminal-SNR schedule (``families.cogvideox``: scaled-linear
  betas, SNR / ``snr_shift_scale``, rescaled so abar_999 = 0), t ~ U{0..999}, one level per clip,
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n. diffusers' training script (examples/cogvideo/
  train_cogvideox_lora.py) turns the network's output v into x0 = sqrt(abar) x_t - sqrt(1 - abar) v
  (``scheduler.get_velocity``) and weighs the x0 error by 1 / (1 - abar_t). As
  x0_pred - x0 = -sqrt(1 - abar_t) (v_pred - v), that weighted x0 error is exactly the error of v, which is what
  ``v_loss`` computes (tests/test_cogvideo_lora_train.py compares both forms on diffusers' scheduler).

The exported file is a peft LoRA under diffusers' module names (``transformer.transformer_blocks.N.attn1.to_q
.lora_A.weight``, alpha / rank folded into B), the layout of the ExVideo-CogVideoX LoRA: ``models.apply_lora``
and diffusers' ``CogVideoXPipeline.load_lora_weights`` both read it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from diffstudio.errors import FrameCountError, InvalidInputError

DEFAULT_FRAMES = 49  # the release's clip length (6 s at 8 fps)
# What the frozen VAE and T5 make of the data depends on these recipe fields only (train.cache.cache_key).
CACHED_FROM = ("data", "model", "frames", "width", "height", "caption_dropout", "precision")


def training_latent_frames(frames: int, patch_t: int | None) -> int:
    """The latent frames of a training clip of ``frames`` video frames (4k + 1, else FrameCountError). CogVideoX 1.5
    patches 2 latent frames into one token, so there the latent count must be even (8k + 5 frames)."""
    from diffstudio.video.cogvideo import latent_frames

    count = latent_frames(frames)
    if patch_t and count % patch_t:
        raise FrameCountError(f"CogVideoX 1.5 trains on an even number of latent frames ({patch_t} per token): "
                              f"--frames 8k + 5 (5, 13, ..., 77, 85), got {frames} ({count} latent frames)")
    return count


# --- data --------------------------------------------------------------------------------------------------


def prepare_clips(models, rows, frames: int, size: tuple[int, int], caption_dropout: float) -> dict:
    """Each (clip, caption) -> {latents (F, 16, h, w) float32, cond {"context": (1, 226, D)}}; ``empty``: the empty
    prompt's conditioning when captions are dropped."""
    import numpy as np
    from tqdm.auto import tqdm

    from diffstudio.train.clips import read_clip_frames
    from diffstudio.train.conditioning import caption_encoder
    from diffstudio.video.cogvideo import CogVideoPipeline

    pipe = CogVideoPipeline(models)
    pipe._vae()  # a model without its VAE stops here, before any clip is read
    encode = caption_encoder(models)
    clips = []
    for path, caption in tqdm(rows, desc="caching clip latents and captions"):
        images = read_clip_frames(path, size, limit=frames)
        if len(images) < frames:
            raise FrameCountError(f"the clip {path} has {len(images)} frames; training takes its first {frames} "
                                  "(--frames). Remove it or lower --frames (4k + 1).")
        with _on_accelerator(pipe._vae()):
            latents = pipe.encode_video([np.asarray(im) for im in images], *size)[0]
        with _on_accelerator(models.text_encoder):
            cond = encode(caption, size)
        clips.append({"latents": latents, "cond": {k: v.cpu() for k, v in cond.items()}})
    empty = None
    if caption_dropout > 0:
        with _on_accelerator(models.text_encoder):
            empty = {k: v.cpu() for k, v in encode("", size).items()}
    return {"clips": clips, "empty": empty}


class _on_accelerator:
    """Runs a frozen encoder on the GPU while the cache is built (when there is one), then puts it back."""

    def __init__(self, module):
        self.module = module
        self.home = next(module.parameters()).device

    def __enter__(self):
        if torch.cuda.is_available() and self.home.type == "cpu":
            self.module.to("cuda")

    def __exit__(self, *exc):
        self.module.to(self.home)


def draw_clips(data: dict, step: int, seed: int, batch_size: int, caption_dropout: float):
    """Step ``step``'s batch: (its generator, latents (B, F, 16, h, w), conditioning), a pure function of (seed,
    step); each clip's caption is dropped with probability ``caption_dropout``, drawn from the generator, which
    the caller goes on using for the noise."""
    from diffstudio.train.conditioning import collate
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator

    clips = data["clips"]
    gen = step_generator(seed, step)
    idx = batch_indices(len(clips), batch_size, step, seed).tolist()
    conds = []
    for i in idx:
        dropped = caption_dropout and torch.rand((), generator=gen).item() < caption_dropout
        conds.append(data["empty"] if dropped else clips[i]["cond"])
    return gen, torch.stack([clips[i]["latents"] for i in idx]).float(), collate(conds)


# --- the objective -----------------------------------------------------------------------------------------


def noised_pair(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, v): the training input sqrt(abar_t) x0 + sqrt(1 - abar_t) n and its target sqrt(abar_t) n - sqrt(1 -
    abar_t) x0 (Salimans & Ho 2022, sec. 4), with one timestep per clip (x0: (B, F, C, h, w), t: (B,))."""
    abar = alphas_cumprod.float()[t].view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, abar.sqrt() * noise - (1 - abar).sqrt() * x0


def v_loss(alphas_cumprod: torch.Tensor, net, x0: torch.Tensor, gen: torch.Generator,
           snr_gamma: float | None = None, rows: slice | None = None) -> torch.Tensor:
    """Mean squared error of ``net(x_t, t) -> v`` against ``noised_pair``'s v at t ~ U{0..T-1}.

    The noise is drawn first, then one timestep per clip. ``snr_gamma``: Min-SNR-gamma (Hang et al. 2023) for a v
    loss, each clip weighed by min(SNR, gamma) / (SNR + 1). ``rows``: this process's share of the batch
    (``train.loop.data_parallel_rows``), drawn for the whole batch first."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
    if rows is not None:
        x0, noise, t = x0[rows], noise[rows], t[rows]
    x_t, target = noised_pair(alphas_cumprod, x0, noise, t)
    out = net(x_t, t)
    per_clip = (out.float() - target.to(out.device)).pow(2).flatten(1).mean(1)
    if snr_gamma is None:
        return per_clip.mean()
    abar = alphas_cumprod.float()[t]
    snr = abar / (1 - abar)
    return ((snr.clamp(max=snr_gamma) / (snr + 1)).to(per_clip.device) * per_clip).mean()


# --- the run -----------------------------------------------------------------------------------------------


def run_recipe(config, models, rows, frames: int, size: tuple[int, int], targets: str, alpha: float) -> dict:
    """What decides what this run learns (``train.recipe``), as ``train.lora.run_recipe`` for images."""
    from diffstudio.train.lora import IMAGE_ONLY, NOT_IN_RECIPE
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    base = config.model or models.sources.get(models.family.denoiser_role)
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE + IMAGE_ONLY}
    return {**settings, "data": data_fingerprint(config.data, rows, "clips"), "model": model_fingerprint(base),
            "family": models.family.name, "frames": frames, "width": size[0], "height": size[1],
            "targets": targets, "alpha": alpha}


def train_cogvideo_lora(config, models, *, stop_after: int | None = None,
                        snapshot: str | Path | None = None) -> Path | None:
    """``train.lora.train_lora`` for a CogVideoX model (its arguments; ``config`` a ``LoRATrainConfig``)."""
    from diffstudio.train.cache import cache_key, load_or_build_cache
    from diffstudio.train.clips import read_clips
    from diffstudio.train.loop import data_parallel_rows, main_process_first
    from diffstudio.train.lora import check_settings, fit_and_export, lora_layers
    from diffstudio.train.recipe import check_resume
    from diffstudio.video.cogvideo import CogVideoPipeline

    family = models.family
    check_settings(config, family)
    if config.resolution is not None or not config.buckets:
        raise InvalidInputError("--resolution and --no-buckets shape image data; a CogVideoX clip's size is "
                                "--width x --height (default 720 x 480)")
    pipe = CogVideoPipeline(models)
    if pipe.image_to_video:
        raise InvalidInputError(f"LoRA training takes the text-to-video CogVideoX models; this one is the "
                                f"image-to-video {models.detection.variant}")
    dit_config = models.configs[family.denoiser_role]
    frames = config.frames if config.frames is not None else DEFAULT_FRAMES
    training_latent_frames(frames, dit_config.patch_size_t)
    defaults = {**asdict(family.defaults), **models.defaults}
    size = (int(config.width or defaults["width"]), int(config.height or defaults["height"]))
    pipe._check_size(*size)
    denoiser, pattern, names, alpha = lora_layers(config, models)
    rows = read_clips(config.data)
    recipe = run_recipe(config, models, rows, frames, size, pattern, alpha)
    check_resume(config.work_path(), recipe, restart=config.restart)  # before any work: a stale run stops here
    rows_of_process = data_parallel_rows(config.batch_size)
    with main_process_first():  # one process writes the work folder's cache, the others read it
        data = load_or_build_cache(config.work_path() / "cache.pt", cache_key(recipe, CACHED_FROM),
                                   lambda: prepare_clips(models, rows, frames, size, config.caption_dropout))

    alphas_cumprod = family.schedule.alphas_cumprod()

    def loss_fn(model, step):
        gen, x0, cond = draw_clips(data, step, config.seed, config.batch_size, config.caption_dropout)
        param = next(denoiser.parameters())  # where accelerate put the transformer
        context = {k: v[rows_of_process].to(param.device, param.dtype) for k, v in cond.items()}

        def net(x_t, t):
            return family.call_denoiser(denoiser, x_t.to(param.device, param.dtype), t.to(param.device), context)

        return v_loss(alphas_cumprod, net, x0, gen, snr_gamma=config.snr_gamma, rows=rows_of_process)

    described = {"ss_num_train_images": str(len(data["clips"])), "ss_resolution": f"({size[0]}, {size[1]})",
                 "ss_num_frames": str(frames)}
    return fit_and_export(config, models, denoiser, names, alpha, recipe, loss_fn, described=described,
                          export_format=config.export_format or "peft", stop_after=stop_after, snapshot=snapshot)
