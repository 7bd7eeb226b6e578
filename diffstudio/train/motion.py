"""Training AnimateDiff motion modules on a frozen image UNet (Guo et al. 2023, arXiv:2307.04725, sec. 4.2).

A fresh ``MotionModules`` (``proj_out`` zero, so training starts from the frame-wise image model) is inserted
through the UNet's temporal hook; the UNet, the VAE and the text encoder stay frozen and only the motion modules
learn. Each sample is a clip of F frames taken at a fixed stride from a training video: its latents
(B, F, C, h, w) are noised with ONE noise level per clip (every frame of a video at the same timestep, as the
paper's eq. 4 noises the whole latent video), the caption's conditioning is repeated for each frame, and the
network is trained on the usual eps (or v) objective, ``objectives.diffusion_loss``.

The noise schedule is AnimateDiff's: its training config (``configs/training/v1/training.yaml``) uses
``beta_schedule: "linear"`` from 0.00085 to 0.012 over 1000 steps, not Stable Diffusion's "scaled_linear" with
the same end points. So by default the motion modules train on the linear schedule (``schedule="linear"``),
and a sampler should use the same one with them (it is stored in the file, ``diffstudio.motion_training``);
``schedule="model"`` trains on the base model's own schedule instead.

What the trainer does, in order (the LoRA trainer's machinery, train/lora.py):
1. load the base model; read the clips (``train.clips``);
2. cache every clip's frame latents and its caption's conditioning once, in ``<workdir>/cache.pt``;
3. train with ``train.loop.train`` (accelerate; exact resume from ``<workdir>/checkpoint``, only under the
   recipe the checkpoint was trained with: ``train.recipe``);
4. write the motion modules in the released AnimateDiff key layout (fp16 by default) with their
   ``MotionConfig`` in the safetensors metadata, so ``motion_loading.add_motion_module`` loads the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.train.motion_config import MotionTrainConfig

SCHEDULES = ("linear", "model")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (MotionTrainConfig lives in motion_config.py: the command line reads its defaults without importing torch)


# Settings that leave every update as it is: they may change between a run and its resume (train.recipe).
NOT_IN_RECIPE = ("data", "out", "model", "workdir", "checkpoint_every", "gradient_checkpointing", "save_dtype",
                 "restart")


def training_prediction(family, schedule: str):
    """The prediction object the modules train on: the family's prediction type (eps / v) on AnimateDiff's
    linear betas (the family's beta_start / beta_end: 0.00085, 0.012 for SD 1.x and SDXL), or the family's own
    schedule for ``"model"``."""
    from diffstudio.sampling.prediction import prediction_for

    if schedule not in SCHEDULES:
        raise InvalidInputError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if family.prediction == "flow":
        raise InvalidInputError(f"motion modules train on discrete-time UNets (eps / v); {family.name} is a flow "
                                "model")
    if schedule == "model":
        return prediction_for(family)
    return prediction_for(replace(family, schedule=replace(family.schedule, kind="linear")))


def motion_config_for(unet, config: MotionTrainConfig):
    """A MotionConfig that fits ``unet``: one module per ResBlock of each level, at that level's width."""
    from diffstudio.models.motion import MotionConfig

    c = unet.config
    try:
        return MotionConfig(level_channels=[m * c.model_channels for m in c.channel_mult],
                            modules_per_level=list(c.num_res_blocks), mid_block=config.mid_block,
                            max_frames=config.max_frames)
    except ValueError as exc:
        raise InvalidInputError(f"no motion module fits this UNet: {exc}") from None


def new_motion_modules(motion_config, seed: int):
    """Fresh modules, their random initialisation a function of ``seed`` alone (proj_out zero)."""
    from diffstudio.models.motion import MotionModules

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MotionModules(motion_config)


# --- data --------------------------------------------------------------------------------------------------


def _prepare_clips(models, rows, config: MotionTrainConfig, size: tuple[int, int]) -> dict:
    """Each clip -> its frames' latents (N, C, h, w) and its caption's conditioning (batch 1)."""
    from tqdm.auto import tqdm

    from diffstudio.io.images import images_to_tensor
    from diffstudio.pipeline.generate import Pipeline
    from diffstudio.train.clips import read_clip_frames
    from diffstudio.train.conditioning import caption_encoder

    pipe = Pipeline(models)
    encode = caption_encoder(models)
    clips = []
    for path, caption in tqdm(rows, desc="caching clip latents and captions"):
        frames = read_clip_frames(path, size)
        if len(frames) < config.span():
            raise InvalidInputError(f"the clip {path} has {len(frames)} frames; {config.frames} frames at stride "
                                    f"{config.stride} need {config.span()}. Remove it or lower --frames/--stride.")
        latents = torch.cat([pipe.encode_images(images_to_tensor(frames[i:i + 16]), tiled=False)
                             for i in range(0, len(frames), 16)])
        clips.append({"latents": latents, "cond": encode(caption, size)})
    return {"clips": clips, "empty": encode("", size)}


def _cache_key(recipe: dict) -> str:
    used = {key: recipe[key] for key in ("data", "model", "resolution", "frames", "stride")}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


def run_recipe(config: MotionTrainConfig, models, rows, resolution: int) -> dict:
    """What decides what this run learns (train.recipe): data and base by fingerprint, settings resolved."""
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    base = config.model or models.sources.get(models.family.denoiser_role)
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE}
    return {**settings, "data": data_fingerprint(config.data, rows, "clips"), "model": model_fingerprint(base),
            "family": models.family.name, "resolution": resolution}


# --- training ----------------------------------------------------------------------------------------------


class _MotionTrainee(torch.nn.Module):
    """The frozen UNet with the motion modules in its temporal hook; only the modules train and are checkpointed.

    ``forward(x, t, **cond)``: x (B, F, C, h, w), t (B,): one level per clip; cond has B*F rows."""

    def __init__(self, unet, motion, net_fn):
        super().__init__()
        self.unet, self.motion = unet, motion
        self.net_fn = net_fn  # the family's network call (pipeline.denoiser.network_fn) of this UNet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        b, f = x.shape[:2]
        out = self.net_fn(x.flatten(0, 1), t.repeat_interleave(f), motion=self.motion, num_frames=f, **cond)
        return out.unflatten(0, (b, f))  # (B*F, ...) -> (B, F, ...): frame index fastest


def _check(config: MotionTrainConfig) -> None:
    from diffstudio.train.loop import OPTIMIZERS

    if min(config.steps, config.batch_size, config.frames, config.stride) < 1:
        raise InvalidInputError("steps, batch_size, frames and stride must be positive")
    if config.frames > config.max_frames:
        raise InvalidInputError(f"{config.frames} frames per clip need a position table of at least as many rows; "
                                f"max_frames is {config.max_frames}")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if config.save_dtype not in SAVE_DTYPES:
        raise InvalidInputError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if not 0.0 <= config.caption_dropout <= 1.0:
        raise InvalidInputError(f"caption_dropout is a share of clips in [0, 1], got {config.caption_dropout}")


def train_motion(config: MotionTrainConfig, models=None, *, stop_after: int | None = None) -> Path | None:
    """Train motion modules on ``config.data`` and write them to ``config.out``.

    Resumes from the checkpoint in ``workdir`` when it was trained under the same recipe, raises
    ``StaleRunError`` when not (unless ``config.restart``). A finished run started again only writes its file
    again. ``models``: an already loaded base (fp32; left as it was afterwards). ``stop_after``: stop after that
    many steps of this call without writing (an interrupted run; the next call resumes)."""
    import diffstudio
    from diffstudio.errors import MotionModuleMismatchError
    from diffstudio.models.unet import UNetModel
    from diffstudio.pipeline.denoiser import network_fn
    from diffstudio.train.cache import load_or_build_cache
    from diffstudio.train.clips import read_clips
    from diffstudio.train.conditioning import collate
    from diffstudio.train.data import batch_indices
    from diffstudio.train.extras import require_train_extra
    from diffstudio.train.loop import discard_checkpoints, step_generator, train
    from diffstudio.train.objectives import diffusion_loss
    from diffstudio.train.recipe import check_resume

    require_train_extra("accelerate")
    _check(config)
    if models is None:
        models = diffstudio.load(*([config.model] if config.model else []))
    family, unet = models.family, models.denoiser
    if not isinstance(unet, UNetModel):
        raise MotionModuleMismatchError(f"motion modules go into an LDM UNet (SD 1.x, SDXL); this {family.name} "
                                        f"model's denoiser is a {type(unet).__name__}")
    if models.dtype != torch.float32:
        raise InvalidInputError(f"train motion modules on a float32 base (this one is {models.dtype}); load it "
                                "with dtype=torch.float32")
    prediction = training_prediction(family, config.schedule)
    if config.snr_gamma is not None and not hasattr(prediction, "min_snr_weight"):
        raise InvalidInputError("snr_gamma weights eps / v training only")
    motion_config = motion_config_for(unet, config)
    defaults = {**asdict(family.defaults), **models.defaults}
    resolution = config.resolution or int(defaults["width"])
    rows = read_clips(config.data)
    recipe = run_recipe(config, models, rows, resolution)
    check_resume(config.work_path(), recipe, restart=config.restart)  # a stale run stops before any work
    data = load_or_build_cache(config.work_path() / "cache.pt", _cache_key(recipe),
                         lambda: _prepare_clips(models, rows, config, (resolution, resolution)))
    clips, empty = data["clips"], data["empty"]

    def loss_fn(trainee, step):
        gen = step_generator(config.seed, step)
        x0, conds = [], []
        for i in batch_indices(len(clips), config.batch_size, step, config.seed).tolist():
            latents = clips[i]["latents"]
            start = int(torch.randint(0, len(latents) - config.span() + 1, (), generator=gen))
            x0.append(latents[start:start + config.span():config.stride])
            dropped = config.caption_dropout and torch.rand((), generator=gen).item() < config.caption_dropout
            conds.append(empty if dropped else clips[i]["cond"])
        device = models.device  # where accelerate put the UNet
        cond = {k: v.repeat_interleave(config.frames, 0).to(device) if isinstance(v, torch.Tensor) else v
                for k, v in collate(conds).items()}  # one row per frame
        x0 = torch.stack(x0).float().to(device)  # (B, F, C, h, w)
        return diffusion_loss(prediction, trainee, x0, cond, gen, snr_gamma=config.snr_gamma)

    # Everything that can refuse the run has run: only now is the UNet changed (and put back afterwards).
    motion = new_motion_modules(motion_config, config.seed).to(models.device)
    frozen = {name: p.requires_grad for name, p in unet.named_parameters()}
    checkpointing = unet.gradient_checkpointing
    unet.requires_grad_(False)
    unet.gradient_checkpointing = config.gradient_checkpointing
    trainee = _MotionTrainee(unet, motion, network_fn(models, check_finite=False))
    if config.restart:
        discard_checkpoints(config.work_path())
    try:
        losses = train(trainee, loss_fn, steps=config.steps, out_dir=config.work_path(), lr=config.lr,
                       warmup=config.warmup, lr_end=config.lr_end, checkpoint_every=config.checkpoint_every,
                       optimizer=config.optimizer, desc=f"motion {family.name}", trainable_only=True,
                       stop_after=stop_after, recipe=recipe)
    finally:
        unet.gradient_checkpointing = checkpointing
        for name, p in unet.named_parameters():
            p.requires_grad_(frozen[name])
        unet.eval()
    if len(losses) < config.steps:
        return None
    return save_motion_modules(motion, config.out, SAVE_DTYPES[config.save_dtype],
                               {"config": asdict(config), "recipe": recipe, "schedule": config.schedule,
                                "final_loss": sum(losses[-50:]) / len(losses[-50:])})


def save_motion_modules(motion, out: str | Path, dtype: torch.dtype, training: dict | None = None) -> Path:
    """Write ``motion`` in the released key layout with its MotionConfig in the metadata (atomically).

    ``training`` (JSON-able) is stored as ``diffstudio.motion_training``; its ``schedule`` says which noise
    schedule the modules were trained on ("linear": AnimateDiff's)."""
    from diffstudio.io.safetensors_file import save_safetensors

    state = {k: v.detach().to("cpu", dtype) for k, v in motion.state_dict().items()}
    metadata = {"diffstudio": {"configs": {"motion": motion.config.to_dict()}}}
    if training is not None:
        metadata["diffstudio.motion_training"] = training
    return save_safetensors(state, out, metadata=metadata)


def motion_training_info(path: str | Path) -> dict:
    """The ``diffstudio.motion_training`` record of a file this trainer wrote ({} for other files)."""
    from diffstudio.io import read_file_metadata

    value = (read_file_metadata(path) or {}).get("diffstudio.motion_training")
    return json.loads(value) if isinstance(value, str) else dict(value or {})
