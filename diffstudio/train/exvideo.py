"""Training an ExVideo-SVD extension (Duan et al. 2024, "ExVideo: Extending Video Diffusion Models via
Parameter-Efficient Post-Tuning", arXiv:2406.14130, sec. 3.2-3.3) on a frozen Stable Video Diffusion UNet.

Every temporal transformer of the SVD UNet gets a position table of ``positions`` rows and a 3x3x3 convolution,
both identity-initialised (``models.exvideo.attach_exvideo``: the extended UNet starts equal to the base), or the
tables of an existing extension (``init``). Only they train, and with ``temporal`` also the temporal transformer
blocks (``time_stack``, ``time_pos_embed``), which the released ExVideo-SVD-128f-v1 fine-tuned; everything else
stays frozen.

Each step takes a clip of ``frames`` frames from a training video, conditioned as SVD's image-to-video pipeline
conditions (video/svd.py): the clip's first frame is the image; its CLIP embedding is the cross-attention token,
its VAE latent (after ``noise_aug`` * N(0, I) noise in pixel space, unscaled) is concatenated to every frame, and
the added time ids are (fps - 1, motion bucket, noise_aug). The noise is EDM's (Karras et al. 2022) with SVD's
preconditioning (``sampling.prediction.EDMV``, sigma_data = 1): one level per clip, ln(sigma) ~ N(p_mean, p_std^2)
(0.7, 1.6: the log-normal SVD fine-tuning uses), x = x0 + sigma n, and the loss is in x0 space, as ExVideo's:

    D = c_skip x + c_out F(c_in x, c_noise),   loss = lambda(sigma) * mean((D - target_scale * x0)^2)

with EDM's weight lambda = (sigma^2 + 1) / sigma^2 (= 1 / c_out^2, so this equals the plain v-space loss).
DiffSynth-Studio's ExVideo training script differs in three settings, each available: sigma uniform over a
1000-step Karras schedule (``sigma_sampling="karras"``), the square root of that weight (``loss_weighting=
"exvideo"``) and a target 1.01 times the clean latent (``target_scale``); it also trains with noise_aug 0.

What the trainer does, in order:
1. load the SVD base; read the clips (``train.clips``: video files or folders of frames);
2. cache every clip's frame latents and, for every frame that can start a training clip, its CLIP embedding
   (and its pixels when ``noise_aug`` > 0: the augmented frame is encoded afresh each step) in
   ``<workdir>/cache.pt``;
3. train with ``train.loop.train`` (accelerate; exact resume from ``<workdir>/checkpoint``, only under the recipe
   the checkpoint was trained with; several processes each take their share of every step's batch);
4. write the extension (the EMA of the weights with ``ema_decay``) in the released ExVideo layout with the recipe
   in its metadata (``train.exvideo_export``), so ``diffstudio.load(svd, ext)`` / ``graft_exvideo`` reads it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from diffstudio.errors import FrameCountError, InvalidInputError
from diffstudio.train.exvideo_config import LOSS_WEIGHTINGS, SIGMA_SAMPLINGS, ExVideoTrainConfig

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KARRAS_STEPS, KARRAS_RHO = 1000, 7.0  # DiffSynth's ContinuousODEScheduler(num_inference_steps=1000) for training

# Settings that leave every update as it is: they may change between a run and its resume (train.recipe).
NOT_IN_RECIPE = ("data", "out", "model", "init", "workdir", "checkpoint_every", "gradient_checkpointing",
                 "save_dtype", "restart", "shard")


def _check(config: ExVideoTrainConfig) -> None:
    from diffstudio.train.loop import OPTIMIZERS

    if min(config.steps, config.batch_size, config.stride, config.width, config.height) < 1:
        raise InvalidInputError("steps, batch_size, stride, width and height must be positive")
    if config.frames < 2:
        raise FrameCountError(f"ExVideo trains clips of at least 2 frames (its convolution runs across frames), "
                              f"got {config.frames}")
    if config.frames > config.table_rows():
        raise FrameCountError(f"{config.frames} frames per clip need position tables of at least as many rows; "
                              f"positions is {config.table_rows()}")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if config.save_dtype not in SAVE_DTYPES:
        raise InvalidInputError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if config.precision not in ("fp32", "bf16"):
        raise InvalidInputError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
    if config.sigma_sampling not in SIGMA_SAMPLINGS:
        raise InvalidInputError(f"sigma_sampling must be one of {', '.join(SIGMA_SAMPLINGS)}, "
                                f"got {config.sigma_sampling!r}")
    if config.loss_weighting not in LOSS_WEIGHTINGS:
        raise InvalidInputError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                                f"got {config.loss_weighting!r}")
    if config.ema_decay is not None and not 0.0 <= config.ema_decay < 1.0:
        raise InvalidInputError(f"ema_decay is in [0, 1), got {config.ema_decay}")
    if not (config.noise_aug >= 0 and config.p_std > 0 and config.target_scale > 0 and config.fps >= 1):
        raise InvalidInputError("noise_aug must be >= 0, p_std and target_scale > 0, fps >= 1")


# --- noise levels and the loss -----------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int = KARRAS_STEPS, rho: float = KARRAS_RHO):
    """Karras et al.'s n levels from sigma_max down to sigma_min (eq. 5), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def draw_sigmas(config: ExVideoTrainConfig, n: int, gen: torch.Generator, schedule) -> torch.Tensor:
    """n noise levels (float64): log-normal (p_mean, p_std), or uniform over the Karras table."""
    if config.sigma_sampling == "karras":
        table = karras_sigmas(schedule.sigma_min, schedule.sigma_max)
        return table[torch.randint(0, len(table), (n,), generator=gen)]
    return (config.p_mean + config.p_std * torch.randn(n, generator=gen, dtype=torch.float64)).exp()


def loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 with sigma_data = 1; "exvideo": its
    square root, sqrt(sigma^2 + 1) / sigma (DiffSynth's ``training_weight``)."""
    weight = (sigma**2 + 1) / sigma**2
    return weight.sqrt() if weighting == "exvideo" else weight


def edm_x0_loss(unet, prediction, x0, noise, sigma, cond: dict, config: ExVideoTrainConfig) -> torch.Tensor:
    """The weighted x0-space error of the UNet's denoised prediction (module docstring).

    x0, noise (B, F, 4, h, w); sigma (B,) float64; cond: image_latents (B, F, 4, h, w), image_embeds (B, 1, P),
    time_ids (B, 3)."""
    x = x0 + sigma.view(-1, 1, 1, 1, 1).to(x0) * noise
    x_in, c_noise = prediction.network_input(x, sigma.to(x0))
    sample = torch.cat([x_in, cond["image_latents"].to(x_in)], dim=2)
    out = unet(sample, c_noise, encoder_hidden_states=cond["image_embeds"], added_time_ids=cond["time_ids"])
    denoised = prediction.to_x0(x, sigma.to(x0), out.float())
    per_clip = (denoised - config.target_scale * x0).pow(2).flatten(1).mean(1)
    return (loss_weight(sigma, config.loss_weighting).to(per_clip) * per_clip).mean()


# --- data --------------------------------------------------------------------------------------------------


def _pixels(frames) -> torch.Tensor:
    from diffstudio.io.images import images_to_tensor

    return images_to_tensor(frames)


def _prepare_clips(models, rows, config: ExVideoTrainConfig) -> dict:
    """Each clip -> its frames' latents (N, 4, h, w, scaled) and, per frame that can start a clip, the CLIP
    embedding (S, P) and (with noise_aug) the uint8 pixels (S, 3, H, W)."""
    from tqdm.auto import tqdm

    from diffstudio.train.cache import _hint_tensor
    from diffstudio.train.clips import read_clip_frames
    from diffstudio.video.svd_conditioning import clip_image_embedding

    latent = models.family.latent
    vae, encoder = models.vae, models.image_encoder
    clips = []
    for path, _ in tqdm(rows, desc="caching clip latents and image embeddings"):
        frames = read_clip_frames(path, (config.width, config.height))
        if len(frames) < config.span():
            raise FrameCountError(f"the clip {path} has {len(frames)} frames; {config.frames} frames at stride "
                                  f"{config.stride} need {config.span()}. Remove it or lower --frames/--stride.")
        starts = len(frames) - config.span() + 1
        with torch.inference_mode():
            latents = _in_chunks(frames, lambda x: latent.to_model(vae.encode(x.to(_device(vae), _dtype(vae)))))
            embeds = _in_chunks(frames[:starts], lambda x: clip_image_embedding(encoder, x.to(_device(encoder)))[:, 0])
        clip = {"latents": latents, "embeds": embeds}
        if config.noise_aug > 0:
            clip["first"] = torch.stack([_hint_tensor(frames[i]) for i in range(starts)])
        clips.append(clip)
    return {"clips": clips}


def _in_chunks(frames: list, encode, chunk: int = 8) -> torch.Tensor:
    """``encode`` (images (n, 3, H, W) in [-1, 1] -> (n, ...)) over the frames, ``chunk`` at a time; float32, CPU."""
    return torch.cat([encode(_pixels(frames[i:i + chunk])).float().cpu() for i in range(0, len(frames), chunk)])


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cache_key(recipe: dict) -> str:
    used = {key: recipe[key] for key in ("data", "model", "width", "height", "frames", "stride", "precision")}
    used["first_pixels"] = recipe["noise_aug"] > 0
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


def run_recipe(config: ExVideoTrainConfig, models, rows) -> dict:
    """What decides what this run learns (train.recipe): data, base and starting extension by fingerprint."""
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    base = config.model or models.sources.get("path")
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE}
    return {**settings, "positions": config.table_rows(), "data": data_fingerprint(config.data, rows, "clips"),
            "model": model_fingerprint(base), "init": model_fingerprint(config.init) if config.init else None}


def draw_step(clips: list, config: ExVideoTrainConfig, step: int):
    """Step ``step``'s clips (a pure function of seed and step): (generator, x0 (B, F, 4, h, w), image embeds
    (B, 1, P), first-frame pixels (B, 3, H, W) in [-1, 1] with their augmentation noise, or None).

    The generator's draws, in order: each clip's start frame, then (noise_aug > 0) each clip's augmentation
    noise; the caller goes on with the latent noise and the levels."""
    from diffstudio.train.data import batch_indices
    from diffstudio.train.loop import step_generator

    gen = step_generator(config.seed, step)
    x0, embeds, starts = [], [], []
    for i in batch_indices(len(clips), config.batch_size, step, config.seed).tolist():
        latents = clips[i]["latents"]
        start = int(torch.randint(0, len(latents) - config.span() + 1, (), generator=gen))
        x0.append(latents[start:start + config.span():config.stride])
        embeds.append(clips[i]["embeds"][start])
        starts.append((i, start))
    first = None
    if config.noise_aug > 0:
        pictures = torch.stack([clips[i]["first"][s] for i, s in starts]).float() / 127.5 - 1.0
        first = pictures + config.noise_aug * torch.randn(pictures.shape, generator=gen)
    return gen, torch.stack(x0).float(), torch.stack(embeds)[:, None], first


# --- training ----------------------------------------------------------------------------------------------


class _ExVideoTrainee(nn.Module):
    """The SVD UNet with its extension: the trainable parameters are the extension's (+ the temporal blocks')."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet


def trainable_modules(unet, temporal: bool) -> list[nn.Module]:
    """The modules that learn: each temporal transformer's ExVideo tables and convolution, and with ``temporal``
    its temporal block and position-embedding MLP (the parts the released extension carries)."""
    modules = []
    for block in unet.video_transformers():
        modules.append(block.exvideo)
        if temporal:
            modules += [block.time_stack, block.time_pos_embed]
    return modules


def temporal_parameters(unet) -> dict[str, torch.Tensor]:
    """{name: tensor} of every temporal transformer's ``time_stack`` and ``time_pos_embed`` (what a released
    extension file carries besides the tables and convolutions)."""
    transformers = set(map(id, unet.video_transformers()))
    prefixes = tuple(f"{name}.{part}." for name, module in unet.named_modules() if id(module) in transformers
                     for part in ("time_stack", "time_pos_embed"))
    return {name: p.detach() for name, p in unet.named_parameters() if name.startswith(prefixes)}


def _extend(unet, config: ExVideoTrainConfig) -> bool:
    """Identity-initialised tables and convolutions, or the ``init`` extension's, on ``unet``. Returns whether the
    UNet now carries an extension's temporal-block weights (an ``init`` file with them), which the written file
    must then carry too, trained or not."""
    from diffstudio.models.exvideo import attach_exvideo

    if config.init:
        from diffstudio.detect.exvideo import derive_exvideo_config
        from diffstudio.exvideo_loading import graft_exvideo
        from diffstudio.io.folders import existing_path
        from diffstudio.io.state_dict import read_state_dict

        state = read_state_dict(existing_path(config.init, "ExVideo extension"))
        found = derive_exvideo_config(state)
        if found.positions != config.table_rows():
            raise InvalidInputError(f"the extension {config.init} has position tables of {found.positions} rows; "
                                    f"this run asks for {config.table_rows()} (--positions)")
        graft_exvideo(unet, state)
        return found.finetuned
    attach_exvideo(unet, positions=config.table_rows())
    return False


def _load_models(config: ExVideoTrainConfig):
    from diffstudio.video.svd_loading import load_svd

    if not config.model:
        raise InvalidInputError("ExVideo extends an SVD model: pass --model svd_xt.safetensors")
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    return load_svd(config.model, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")


def train_exvideo(config: ExVideoTrainConfig, models=None, *, stop_after: int | None = None) -> Path | None:
    """Train an ExVideo extension on ``config.data`` and write it to ``config.out`` (module docstring).

    ``models``: an already loaded SVD (``load_svd`` / ``diffstudio.load``); its UNet is left extended with the
    trained weights (the raw ones, not the EMA), its parameters' requires_grad as they were. Resumes from the
    checkpoint in ``workdir`` when it was trained under the same recipe, raises ``StaleRunError`` when not (unless
    ``config.restart``). ``stop_after``: stop after that many steps of this call without writing (an interrupted
    run; the next call resumes). Returns the file's path (None in processes other than 0, or when stopped)."""
    from diffstudio.models.svd_unet import SVDUNet
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.cache import load_or_build_cache
    from diffstudio.train.clips import read_clips
    from diffstudio.train.ema import EMA
    from diffstudio.train.extras import require_train_extra
    from diffstudio.train.exvideo_export import save_exvideo
    from diffstudio.train.loop import data_parallel_rows, discard_checkpoints, main_process_first, process_rank, train
    from diffstudio.train.recipe import check_resume
    from diffstudio.video.svd_conditioning import added_time_ids

    require_train_extra("accelerate")
    _check(config)
    rows = read_clips(config.data)  # bad data stops before a model loads
    if models is None:
        models = _load_models(config)
    unet = models.unet
    if not isinstance(unet, SVDUNet):
        raise InvalidInputError(f"ExVideo extends the SVD UNet; this model's denoiser is a {type(unet).__name__}")
    f = models.vae.downscale_factor
    if config.width % f or config.height % f:
        raise InvalidInputError(f"width and height must be multiples of {f}, got {config.width}x{config.height}")
    recipe = run_recipe(config, models, rows)
    check_resume(config.work_path(), recipe, restart=config.restart)  # a stale run stops before any work
    share = data_parallel_rows(config.batch_size)
    with main_process_first():
        data = load_or_build_cache(config.work_path() / "cache.pt", _cache_key(recipe),
                                   lambda: _prepare_clips(models, rows, config))
    clips = data["clips"]
    prediction = prediction_for(models.family)
    time_ids = added_time_ids(config.fps, config.motion_bucket_id, config.noise_aug)

    def loss_fn(trainee, step):
        gen, x0, embeds, first = draw_step(clips, config, step)
        device = _device(trainee.unet)
        if first is None:  # the clean first frame: its cached latent, unscaled
            first_latent = models.family.latent.from_model(x0[:, 0])
        else:
            with torch.no_grad():
                first_latent = models.vae.encode(first.to(_device(models.vae), _dtype(models.vae))).float().cpu()
        noise = torch.randn(x0.shape, generator=gen)
        sigma = draw_sigmas(config, x0.shape[0], gen, models.family.schedule)
        cond = {"image_latents": first_latent[:, None].expand(x0.shape), "image_embeds": embeds,
                "time_ids": time_ids.expand(x0.shape[0], 3)}
        cond = {k: v[share].to(device) for k, v in cond.items()}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" \
            else contextlib.nullcontext()
        with autocast:
            return edm_x0_loss(trainee.unet, prediction, x0[share].to(device), noise[share].to(device),
                               sigma[share], cond, config)

    # Everything that can refuse the run has run: only now is the UNet changed.
    frozen = {name: p.requires_grad for name, p in unet.named_parameters()}
    checkpointing = unet.gradient_checkpointing
    carries_temporal = _extend(unet, config)
    unet.requires_grad_(False)
    for module in trainable_modules(unet, config.temporal):
        module.float().requires_grad_(True)  # the trained weights stay float32 under bf16
    unet.gradient_checkpointing = config.gradient_checkpointing
    trainee = _ExVideoTrainee(unet)
    ema = EMA(trainee, config.ema_decay) if config.ema_decay is not None else None
    with main_process_first():
        if config.restart and process_rank()[0] == 0:
            discard_checkpoints(config.work_path())
    try:
        losses = train(trainee, loss_fn, steps=config.steps, out_dir=config.work_path(), lr=config.lr,
                       warmup=config.warmup, lr_end=config.lr_end, checkpoint_every=config.checkpoint_every,
                       optimizer=config.optimizer, desc="exvideo svd", trainable_only=True,
                       stop_after=stop_after, recipe=recipe, ema=ema, shard=config.shard)
        weights = {name[len("unet."):]: (ema.shadow[name] if ema is not None else p.detach())
                   for name, p in trainee.named_parameters() if p.requires_grad}
        if carries_temporal and not config.temporal:  # the init file's temporal weights, kept frozen, go along
            weights.update(temporal_parameters(unet))
    finally:
        unet.gradient_checkpointing = checkpointing
        for name, p in unet.named_parameters():
            p.requires_grad_(frozen.get(name, False))
        unet.eval()
    if len(losses) < config.steps or process_rank()[0] != 0:
        return None
    tail = losses[-50:]
    training = {"config": asdict(config), "recipe": recipe, "ema": config.ema_decay is not None,
                "final_loss": sum(tail) / len(tail) if tail and all(map(math.isfinite, tail)) else None}
    return save_exvideo(unet, weights, config.out, SAVE_DTYPES[config.save_dtype], training)
