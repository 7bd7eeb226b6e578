"""LoRA training for every family: one entry point, the family record supplies the rest.

LoRA (Hu et al. 2021): a frozen weight W gets a trainable low-rank update
W' = W + (alpha / r) * B A, with A (r x in) and B (out x r), B initialised to zero so training
starts from the base model. The adapters are injected with peft into the denoiser's
Linear / 1x1-Conv layers whose names match the family's ``lora_targets`` pattern.

What the trainer does, in order:
1. load the base model (fp32, or bf16 weights with fp32 adapters);
2. read the data folder (images + ``metadata.csv`` or ``.txt`` captions) and put each image in
   its aspect-ratio bucket (``train.buckets``);
3. cache every image's latent and every caption's conditioning once (the VAE and the text
   encoders are frozen and never run again), in ``<workdir>/cache.pt`` (``train.cache``);
4. train with ``train.loop.train`` (accelerate; exact resume from ``<workdir>/checkpoint``, only under the
   recipe the checkpoint was trained with: ``train.recipe``);
5. export the adapters in kohya format (default) or diffusers/peft format (``train.lora_export``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffstudio.errors import InvalidInputError


@dataclass
class LoRATrainConfig:
    data: str  # folder of images + metadata.csv (file_name,text) or a .txt caption beside each image
    out: str  # the exported LoRA file (.safetensors)
    model: str | None = None  # base model path; None = the packaged Shapes demo model
    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1)
    targets: str | None = None  # regex over the denoiser's module names; None = the family's lora_targets
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    warmup: int = 0
    lr_end: float | None = None  # anneal to this rate by the last step (half cosine); None = constant
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (eps / v families; 5 is the paper's)
    resolution: int | None = None  # bucket area = resolution**2; None = the model's default width
    buckets: bool = True  # False: every image is resized to resolution x resolution
    precision: str = "fp32"  # "bf16": base weights in bf16 (half the memory), adapters in fp32
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw_fused" (torch's fused kernel), "adamw8bit" (bitsandbytes)
    caption_dropout: float = 0.0  # share of steps that see the empty prompt (keeps CFG working)
    seed: int = 0
    checkpoint_every: int = 100
    workdir: str | None = None  # checkpoints and caches; None = "<out>.run"
    export_format: str | None = None  # "kohya" or "peft" (diffusers'); None = the family's (kohya; CogVideoX: peft)
    restart: bool = False  # discard the work folder's checkpoint (made with another recipe) and start at step 0
    shard: str | None = None  # "fsdp": under several processes, shard the model and optimizer over them
    # Video families (CogVideoX, train/cogvideo_lora.py): frames per training clip and the clip size in pixels
    frames: int | None = None  # None = the family's (CogVideoX: 49)
    width: int | None = None  # None = the model's default width
    height: int | None = None

    def work_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".run")


# --- the adapters ---------------------------------------------------------------------------------------


def target_modules(module: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear and 1x1 Conv2d layers whose full name matches ``pattern``."""
    regex = re.compile(pattern)
    names = []
    for name, child in module.named_modules():
        is_linear = isinstance(child, torch.nn.Linear)
        is_pointwise = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
        if (is_linear or is_pointwise) and regex.fullmatch(name):
            names.append(name)
    return names


def inject_lora(module: torch.nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> None:
    """Wrap the named layers with trainable LoRA adapters (B = 0, so the output is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)  # A's random initialisation
    module.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=True),
                            module)


def remove_lora(module: torch.nn.Module) -> None:
    """Put the base layers back in place of peft's wrappers (the base weights were never changed)."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.get_base_layer())
    if "peft_config" in vars(module):  # set by inject_adapter_in_model; a later injection would warn about it
        del module.peft_config


def adapter_weights(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A (r x in[,1,1]), B (out x r[,1,1]))} of every injected adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, child in module.named_modules():
        if isinstance(child, LoraLayer):
            out[name] = (child.lora_A["default"].weight.detach().float().clone(),
                         child.lora_B["default"].weight.detach().float().clone())
    return out


# --- training -------------------------------------------------------------------------------------------------


class _Trainee(torch.nn.Module):
    """The denoiser with its adapters; only the adapter weights are trainable and checkpointed."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser


# Settings that leave every update as it is (where files go, how often a checkpoint is saved, a memory switch
# whose recomputation gives the same gradients up to rounding): they may change between a run and its resume.
NOT_IN_RECIPE = ("data", "out", "model", "workdir", "checkpoint_every", "gradient_checkpointing", "export_format",
                 "restart", "shard")
# Settings of one kind of trainer only: the other refuses them when set and leaves them out of its recipe.
IMAGE_ONLY = ("resolution", "buckets")
VIDEO_ONLY = ("frames", "width", "height")


def run_recipe(config: LoRATrainConfig, models, rows, resolution: int, targets: str, alpha: float) -> dict:
    """What decides what this run learns (``train.recipe``): the data and base model by fingerprint, the settings
    with their defaults resolved. A setting added to the config is part of it unless listed in NOT_IN_RECIPE."""
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    base = config.model or models.sources.get(models.family.denoiser_role)
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE + VIDEO_ONLY}
    return {**settings, "data": data_fingerprint(config.data, rows), "model": model_fingerprint(base),
            "family": models.family.name, "resolution": resolution, "targets": targets, "alpha": alpha}


def check_settings(config: LoRATrainConfig, family) -> None:
    """The checks every LoRA trainer makes before it loads data."""
    from diffstudio.train.loop import OPTIMIZERS

    if config.precision not in ("fp32", "bf16"):
        raise InvalidInputError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
    if config.rank < 1 or config.steps < 1 or config.batch_size < 1:
        raise InvalidInputError("rank, steps and batch_size must be positive")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if config.export_format not in (None, "kohya", "peft"):
        raise InvalidInputError(f"unknown LoRA export format {config.export_format!r}; use 'kohya' or 'peft'")
    if config.snr_gamma is not None and family is not None and family.prediction == "flow":
        raise InvalidInputError(f"--snr-gamma weights eps/v training; {family.name} is trained by flow matching")


def lora_layers(config: LoRATrainConfig, models) -> tuple[torch.nn.Module, str, list[str], float]:
    """(the denoiser, the target pattern, the names of the layers it matches, alpha), refusing a pattern that
    matches nothing and a gradient-checkpointing request the denoiser cannot take."""
    family = models.family
    denoiser = models.activate().denoiser  # this model's own patches (a prompt-tag clone's may be in the weights)
    pattern = config.targets or family.lora_targets
    names = target_modules(denoiser, pattern)
    if not names:
        raise InvalidInputError(f"no Linear/1x1-Conv layer of the {family.name} denoiser matches {pattern!r}")
    if config.gradient_checkpointing and not hasattr(denoiser, "gradient_checkpointing"):
        raise InvalidInputError(f"the {family.name} denoiser has no gradient checkpointing switch")
    return denoiser, pattern, names, float(config.alpha if config.alpha is not None else config.rank)


def train_lora(config: LoRATrainConfig, models=None, *, stop_after: int | None = None,
               snapshot: str | Path | None = None) -> Path | None:
    """Train a LoRA on ``config.data`` and export it to ``config.out``.

    Resumes from the checkpoint in ``workdir`` when it was trained with the same recipe (``run_recipe``), and
    raises ``StaleRunError`` when not, unless ``config.restart`` (then the checkpoint is discarded once the new
    run has loaded its model and data). A finished run started again only exports its checkpoint again.
    ``models``: an already loaded base (left unchanged afterwards). ``stop_after`` stops after that many
    steps of this call without exporting (an interrupted run; the next call resumes); with ``snapshot``, the
    LoRA as it stands then is written to that file (to render a sample of the checkpoint), not to ``config.out``.

    A family with a trainer of its own (``Family.lora_trainer``: CogVideoX trains on clips) is handed to it."""
    import importlib

    import diffstudio
    from diffstudio.train.extras import require_train_extra

    require_train_extra()
    check_settings(config, None)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    if models is None:
        models = diffstudio.load(*([config.model] if config.model else []), dtype=dtype)
    if models.family.lora_trainer:
        module, name = models.family.lora_trainer.split(":")
        return getattr(importlib.import_module(module), name)(config, models, stop_after=stop_after,
                                                              snapshot=snapshot)
    return _train_image_lora(config, models, stop_after=stop_after, snapshot=snapshot)


def _train_image_lora(config: LoRATrainConfig, models, *, stop_after: int | None,
                      snapshot: str | Path | None) -> Path | None:
    from diffstudio.pipeline.denoiser import network_fn
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.cache import cache_key, draw_batch, load_or_build_cache, prepare_items
    from diffstudio.train.data import read_captions
    from diffstudio.train.loop import data_parallel_rows, main_process_first
    from diffstudio.train.objectives import diffusion_loss
    from diffstudio.train.recipe import check_resume

    family = models.family
    check_settings(config, family)
    video_only = [f"--{k}" for k in VIDEO_ONLY if getattr(config, k) is not None]
    if video_only:
        raise InvalidInputError(f"{', '.join(video_only)} set the clips of video families (CogVideoX); "
                                f"{family.name} trains on images (--resolution)")
    defaults = {**asdict(family.defaults), **models.defaults}
    resolution = config.resolution or int(defaults["width"])
    denoiser, pattern, names, alpha = lora_layers(config, models)
    rows = read_captions(config.data)
    recipe = run_recipe(config, models, rows, resolution, pattern, alpha)
    check_resume(config.work_path(), recipe, restart=config.restart)  # before any work: a stale run stops here
    rows_of_process = data_parallel_rows(config.batch_size)  # several processes: each its share of every batch
    with main_process_first():  # one process writes the work folder's cache, the others read it
        data = load_or_build_cache(config.work_path() / "cache.pt", cache_key(recipe), lambda: prepare_items(
            models, rows, resolution=resolution, buckets=config.buckets, caption_dropout=config.caption_dropout))

    items = data["items"]
    prediction = prediction_for(family)
    net_fn = network_fn(models, check_finite=False)

    def loss_fn(model, step):
        _, gen, x0, cond = draw_batch(data, step, config.seed, config.batch_size, config.caption_dropout)
        return diffusion_loss(prediction, net_fn, x0, cond, gen, snr_gamma=config.snr_gamma, rows=rows_of_process)

    described = {"ss_num_train_images": str(len(items)), "ss_resolution": f"({resolution}, {resolution})",
                 "ss_enable_bucket": str(config.buckets)}
    return fit_and_export(config, models, denoiser, names, alpha, recipe, loss_fn, described=described,
                          export_format=config.export_format or "kohya", stop_after=stop_after, snapshot=snapshot)


def fit_and_export(config: LoRATrainConfig, models, denoiser, names: list[str], alpha: float, recipe: dict,
                   loss_fn, *, described: dict, export_format: str, stop_after: int | None,
                   snapshot: str | Path | None) -> Path | None:
    """Inject the adapters into ``names``, train them on ``loss_fn(model, step)`` with ``train.loop.train``, put
    the base layers back, and export (process 0 only; an interrupted run writes only ``snapshot``, if given).

    Called once everything that can refuse the run has run: the model is changed only here, and put back
    afterwards. ``described``: the data's kohya-style metadata (``ss_num_train_images``, ``ss_resolution``...)."""
    from diffstudio.train.loop import discard_checkpoints, main_process_first, process_rank, train
    from diffstudio.train.lora_export import save_lora

    family = models.family
    checkpointing = getattr(denoiser, "gradient_checkpointing", None)
    inject_lora(denoiser, names, config.rank, alpha, config.seed)
    if config.gradient_checkpointing:
        denoiser.gradient_checkpointing = True
    trainee = _Trainee(denoiser)
    with main_process_first():
        if config.restart and process_rank()[0] == 0:  # the new run is ready: only now does the old one go
            discard_checkpoints(config.work_path())
    try:
        losses = train(trainee, loss_fn, steps=config.steps, out_dir=config.work_path(), lr=config.lr,
                       warmup=config.warmup, lr_end=config.lr_end, checkpoint_every=config.checkpoint_every,
                       optimizer=config.optimizer,
                       desc=f"lora {family.name}", trainable_only=True, stop_after=stop_after, recipe=recipe,
                       shard=config.shard)
        weights = adapter_weights(denoiser)
    finally:
        remove_lora(denoiser)
        if config.gradient_checkpointing:
            denoiser.gradient_checkpointing = checkpointing
    if process_rank()[0] != 0:  # not the process that exports
        return None
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                "ss_network_alpha": str(alpha), "ss_learning_rate": str(config.lr),
                "ss_max_train_steps": str(config.steps), **described, "ss_seed": str(config.seed),
                "ss_base_model_version": family.name, "ss_training_comment": "trained with diffstudio",
                "ss_batch_size_per_device": str(config.batch_size),
                "diffstudio.lora": json.dumps({"config": asdict(config), "recipe": recipe,
                                               "final_loss": losses[-1] if losses else None})}
    if len(losses) < config.steps:  # interrupted: the run resumes from its checkpoint
        if snapshot is not None:
            save_lora(models, weights, alpha, snapshot, export_format, metadata)
        return None
    return save_lora(models, weights, alpha, config.out, export_format, metadata)
