"""ControlNet training (Zhang, Rao & Agrawala 2023, arXiv:2302.05543, sections 3.1-3.3) for SD 1.x and SDXL.

The ControlNet starts as a copy of the base UNet's encoder half and middle block (its ``input_blocks``,
``middle_block``, ``time_embed`` and SDXL's ``label_emb`` take the UNet's weights, under the same names), with
its zero convolutions (``zero_convs``, ``middle_block_out``) and the hint encoder's last conv set to zero
(eq. 2 and sec. 3.2). So before the first step it adds nothing: the controlled UNet gives the base output
exactly, and the gradient first reaches the zero convs, then everything behind them.

Only the ControlNet trains; the base UNet, VAE and text encoders are frozen (the paper's "locked copy").
The loss is the base model's own objective (``train.objectives.diffusion_loss`` with the family's
prediction object): at a random noise level the UNet, given the ControlNet's residuals for the control
image, predicts the noise (eps), v or the flow velocity.

Data: a folder with ``metadata.csv`` (columns ``file_name``, ``conditioning_image``, ``text``: diffusers'
ControlNet training layout) and the images. Everything else is the LoRA trainer's machinery: the cache of
latents, conditioning and control images (``train.cache``), the accelerate loop with exact resume
(``train.loop``), the recipe check before a resume (``train.recipe``). The result is one safetensors file in
cldm names with its ``ControlNetConfig`` in the metadata, written atomically; ``models.add_controlnet(path)``
loads it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffstudio.errors import ControlNetMismatchError, InvalidInputError, ModelNotFoundError

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ("file_name", "conditioning_image", "text")


@dataclass
class ControlNetTrainConfig:
    data: str  # folder of images + condition images + metadata.csv (file_name,conditioning_image,text)
    out: str  # the ControlNet file to write (.safetensors)
    model: str | None = None  # base model path; None = the packaged Shapes demo model
    hint_block_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])  # the hint encoder's widths
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5  # the paper's rate (sec. 4)
    warmup: int = 0
    lr_end: float | None = None  # anneal to this rate by the last step (half cosine); None = constant
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (eps / v families)
    resolution: int | None = None  # bucket area = resolution**2; None = the model's default width
    buckets: bool = True  # False: every image is resized to resolution x resolution
    precision: str = "fp32"  # "bf16": the frozen base in bf16, the ControlNet in fp32
    optimizer: str = "adamw"  # or "adamw_fused", "adamw8bit"
    caption_dropout: float = 0.0  # share of samples that see the empty prompt (the paper drops 50%)
    seed: int = 0  # the hint encoder's initial weights, the batches, the noise
    checkpoint_every: int = 100
    workdir: str | None = None  # checkpoints and caches; None = "<out>.run"
    save_dtype: str = "fp32"  # the file's dtype: fp32, fp16 or bf16
    restart: bool = False  # discard the work folder's checkpoint (made with another recipe) and start at step 0
    shard: str | None = None  # "fsdp": under several processes, shard the ControlNet and optimizer over them

    def work_path(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".run")


# Settings that leave every update as it is: they may change between a run and its resume.
NOT_IN_RECIPE = ("data", "out", "model", "workdir", "checkpoint_every", "save_dtype", "restart", "shard")


# --- data ----------------------------------------------------------------------------------------------------


def read_control_data(folder: str | Path) -> list[tuple[Path, Path, str]]:
    """(image, control image, caption) per row of ``folder/metadata.csv`` (columns file_name,
    conditioning_image, text; paths relative to the folder)."""
    folder = Path(folder)
    meta = folder / "metadata.csv"
    if not folder.is_dir():
        raise ModelNotFoundError(f"training data folder {folder} does not exist")
    if not meta.is_file():
        raise ModelNotFoundError(f"{folder} has no metadata.csv: ControlNet training reads a CSV with the columns "
                                 f"{', '.join(COLUMNS)} (an image, its control image, its caption per row)")
    with meta.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InvalidInputError(f"{meta} lacks the column(s) {', '.join(missing)}; ControlNet training needs "
                                    f"{', '.join(COLUMNS)} (found: {', '.join(reader.fieldnames or ())})")
        rows = [(folder / r["file_name"], folder / r["conditioning_image"], r["text"]) for r in reader]
    if not rows:
        raise ModelNotFoundError(f"{meta} lists no images")
    absent = [str(p) for image, hint, _ in rows for p in (image, hint) if not p.exists()]
    if absent:
        raise ModelNotFoundError(f"{len(absent)} files listed in {meta} are missing, e.g. {absent[0]}")
    return rows


# --- the model -----------------------------------------------------------------------------------------------

# The ControlNet's own modules, which the UNet does not have; every other parameter is copied from the UNet.
OWN_MODULES = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def controlnet_from_unet(unet, hint_block_channels=(16, 32, 96, 256), seed: int = 0):
    """A float32 ControlNet initialised from ``unet`` (a UNetModel): its encoder, middle block and embeddings
    copied, the zero convs and the hint encoder's last conv zero, the other hint convs drawn from ``seed``."""
    from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel

    config = ControlNetConfig.from_unet(unet.config, hint_block_channels=list(hint_block_channels))
    with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
        torch.manual_seed(seed)
        controlnet = ControlNetModel(config)
    base = unet.state_dict()
    own = controlnet.state_dict()
    copied = {k: base.get(k) for k in own if not k.startswith(OWN_MODULES)}
    absent = [k for k, v in copied.items() if v is None]
    if absent:  # cannot happen for a UNetModel: the ControlNet's encoder is built block for block like its own
        raise ControlNetMismatchError(f"the base UNet has no {absent[0]}: it does not match its ControlNet copy")
    controlnet.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for zero in [*controlnet.zero_convs, controlnet.middle_block_out, controlnet.input_hint_block[-1]]:
            for p in zero.parameters():
                p.zero_()
    return controlnet


def controlled_network(net_fn, models, hints: torch.Tensor):
    """``net(controlnet, x, t, **cond)``: the base network call (``network_fn``) given the ControlNet's residuals
    for the control images ``hints`` (B, 3, H, W) in [0, 1]; the ControlNet sees the UNet's own inputs."""

    def call(controlnet, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        device = next(controlnet.parameters()).device
        context, y = cond.get("context"), cond.get("y")
        residuals = controlnet(x.to(device), hints.to(device), t.to(device),
                               None if context is None else context.to(device), None if y is None else y.to(device))
        control = [r.to(models.device, models.dtype) for r in residuals]
        return net_fn(x, t, control=control, **cond)

    return call


# --- training ------------------------------------------------------------------------------------------------


def run_recipe(config: ControlNetTrainConfig, models, rows, resolution: int) -> dict:
    """What decides what this run learns (``train.recipe``): the data (images, control images and captions) and
    the base model by fingerprint, every setting not in NOT_IN_RECIPE, defaults resolved."""
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    images = data_fingerprint(config.data, [(image, text) for image, _, text in rows])
    hints = data_fingerprint(config.data, [(hint, "") for _, hint, _ in rows]).split("sha256 ")[1]
    base = config.model or models.sources.get(models.family.denoiser_role)
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE}
    return {**settings, "data": f"{images}, control images sha256 {hints}", "model": model_fingerprint(base),
            "family": models.family.name, "resolution": resolution}


def _check(config: ControlNetTrainConfig) -> None:
    from diffstudio.train.loop import OPTIMIZERS

    if config.precision not in ("fp32", "bf16"):
        raise InvalidInputError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
    if config.save_dtype not in SAVE_DTYPES:
        raise InvalidInputError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if config.steps < 1 or config.batch_size < 1:
        raise InvalidInputError("steps and batch_size must be positive")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if not config.hint_block_channels or min(config.hint_block_channels) < 1:
        raise InvalidInputError(f"hint_block_channels must be positive widths, got {config.hint_block_channels}")


def train_controlnet(config: ControlNetTrainConfig, models=None, *, stop_after: int | None = None) -> Path | None:
    """Train a ControlNet for the base model on ``config.data`` and write it to ``config.out``.

    Resumes from the checkpoint in ``workdir`` when it was trained with the same recipe, raises
    ``StaleRunError`` when not (unless ``config.restart``). A finished run started again only writes its file
    again. ``models``: an already loaded base (left unchanged). ``stop_after`` stops after that many steps of
    this call without writing the file (an interrupted run; the next call resumes). Returns the file, or None
    when stopped early."""
    import diffstudio
    from diffstudio.models.unet import UNetConfig
    from diffstudio.pipeline.denoiser import network_fn
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.cache import cache_key, draw_batch, load_or_build_cache, prepare_items
    from diffstudio.train.extras import require_train_extra
    from diffstudio.train.loop import data_parallel_rows, discard_checkpoints, main_process_first, process_rank, train
    from diffstudio.train.objectives import diffusion_loss
    from diffstudio.train.recipe import check_resume

    require_train_extra("accelerate")
    _check(config)
    if models is None:
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        models = diffstudio.load(*([config.model] if config.model else []), dtype=dtype)
    family = models.family
    unet = models.denoiser
    if not isinstance(getattr(unet, "config", None), UNetConfig):
        raise ControlNetMismatchError(f"this {family.name} model's denoiser is not an LDM UNet: diffstudio trains "
                                      "ControlNets for SD 1.x and SDXL models")
    if unet.config.in_channels != family.latent.channels:
        raise ControlNetMismatchError(f"this UNet takes {unet.config.in_channels} input channels (an inpainting "
                                      f"model), not the {family.latent.channels}-channel latent: train the ControlNet "
                                      "on the model's ordinary (non-inpainting) version")
    stages = family.latent.downscale.bit_length()  # the hint encoder halves the size once between stages
    if len(config.hint_block_channels) != stages:
        raise InvalidInputError(f"the hint encoder needs {stages} stage widths for this model's latents, "
                                f"{family.latent.downscale}x smaller than the image (one halving between stages), "
                                f"got {config.hint_block_channels}; the released ControlNets use 16,32,96,256")
    if config.snr_gamma is not None and family.prediction == "flow":
        raise InvalidInputError(f"--snr-gamma weights eps/v training; {family.name} is trained by flow matching")
    resolution = config.resolution or int({**asdict(family.defaults), **models.defaults}["width"])
    rows = read_control_data(config.data)
    recipe = run_recipe(config, models, rows, resolution)
    check_resume(config.work_path(), recipe, restart=config.restart)  # before any work: a stale run stops here
    rows_of_process = data_parallel_rows(config.batch_size)  # several processes: each its share of every batch
    with main_process_first():  # one process writes the work folder's cache, the others read it
        data = load_or_build_cache(config.work_path() / "cache.pt", cache_key(recipe), lambda: prepare_items(
            models, [(image, text) for image, _, text in rows], resolution=resolution, buckets=config.buckets,
            caption_dropout=config.caption_dropout, hints=[hint for _, hint, _ in rows]))

    controlnet = controlnet_from_unet(unet, config.hint_block_channels, config.seed).to(models.device)
    prediction = prediction_for(family)
    net_fn = network_fn(models, check_finite=False)
    items = data["items"]

    def loss_fn(model, step):
        idx, gen, x0, cond = draw_batch(data, step, config.seed, config.batch_size, config.caption_dropout)
        hints = torch.stack([items[i]["hint"] for i in idx]).float() / 255.0
        net = controlled_network(net_fn, models, hints[rows_of_process])
        return diffusion_loss(prediction, lambda x, t, **c: net(model, x, t, **c), x0, cond, gen,
                              snr_gamma=config.snr_gamma, rows=rows_of_process)

    with main_process_first():
        if config.restart and process_rank()[0] == 0:  # the new run is ready: only now does the old one go
            discard_checkpoints(config.work_path())
    frozen = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)  # the locked copy: gradients flow through it to the residuals, none are kept
    try:
        losses = train(controlnet, loss_fn, steps=config.steps, out_dir=config.work_path(), lr=config.lr,
                       warmup=config.warmup, lr_end=config.lr_end, checkpoint_every=config.checkpoint_every,
                       optimizer=config.optimizer, desc=f"controlnet {family.name}", stop_after=stop_after,
                       recipe=recipe, shard=config.shard)
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(frozen[name])
    if len(losses) < config.steps or process_rank()[0] != 0:  # interrupted, or not the process that writes
        return None
    metadata = {"diffstudio.controlnet_training": json.dumps({"config": asdict(config), "recipe": recipe,
                                                               "images": len(items), "final_loss": losses[-1]})}
    return save_controlnet(controlnet, family.name, config.out, SAVE_DTYPES[config.save_dtype], metadata)


def save_controlnet(controlnet, family: str, out: str | Path, dtype: torch.dtype = torch.float32,
                    metadata: dict | None = None) -> Path:
    """Write ``controlnet`` as one safetensors file in cldm names, its config in the metadata (so
    ``add_controlnet`` reads heads and norm groups from it), atomically."""
    from diffstudio.detect.controlnet import ROLE
    from diffstudio.io.safetensors_file import save_safetensors
    from diffstudio.save import metadata_for

    tensors = {k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()
               for k, v in controlnet.state_dict().items()}
    return save_safetensors(tensors, out, metadata_for(family, {ROLE: (ROLE, controlnet.config)}, metadata))
