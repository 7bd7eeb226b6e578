"""IP-Adapter training (Ye et al. 2023, arXiv:2308.06721, sections 3.2-3.3 and 4.1) for SD 1.x and SDXL.

What trains: the image projection (``image_proj``, the base adapter's Linear + LayerNorm to ``num_tokens``
tokens) and every cross-attention layer's image keys and values (``ip_adapter.N.to_k_ip`` / ``to_v_ip``), the
new weights of the decoupled cross-attention (eq. 5). The base UNet, VAE and text encoders are frozen; so is a
loaded CLIP image encoder (the paper's). A Shapes image encoder (models/shapes_image_encoder.py) may train with
the adapter, and a new one does by default.

The paper's recipe: the reference image of each sample is the training image itself; the image keys and
values start as copies of the layer's text keys and values (W'_k = W_k, W'_v = W_v, as in the authors' training
script), so the image tokens are read like text from the first step; text and image are dropped for
classifier-free guidance (``caption_dropout`` and ``image_dropout``, drawn independently per sample; a dropped
image is the zero image embedding, the negative the pipeline uses at sampling time). The loss is the base
model's own objective (``train.objectives.diffusion_loss``) with the image tokens in the UNet's ``ip`` hook.

Data: an image folder with captions (``metadata.csv`` file_name,text, or a ``.txt`` beside each image), as for
LoRA training. Everything else is the other trainers' machinery: the cache of latents and conditioning
(``train.cache``, with each reference fitted to the encoder's input size beside it), the accelerate loop with
exact resume (``train.loop``), the recipe check before a resume (``train.recipe``). The result is one
safetensors file in the released names with its ``IPAdapterConfig`` in the metadata (and a Shapes encoder
bundled under ``image_encoder.``), written atomically; ``models.add_ip_adapter(path)`` loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from diffstudio.errors import InvalidInputError, IPAdapterMismatchError
from diffstudio.train.ip_adapter_config import NOT_IN_RECIPE, IPAdapterTrainConfig

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["IPAdapterTrainConfig", "train_ip_adapter", "adapter_for", "save_ip_adapter"]


class AdapterAndEncoder(nn.Module):
    """What the loop optimises: the adapter and the image encoder (its parameters train or not)."""

    def __init__(self, adapter: nn.Module, encoder: nn.Module):
        super().__init__()
        self.adapter, self.encoder = adapter, encoder


def adapter_for(unet, image_dim: int, num_tokens: int = 4, seed: int = 0):
    """A float32 base IP-Adapter (linear projection) for ``unet`` reading ``image_dim``-wide image embeddings:
    the projection drawn from ``seed``, each layer's image keys / values copies of its text keys / values."""
    from diffstudio.models.ipadapter import IPAdapter, IPAdapterConfig

    layers = unet.cross_attention_layers()
    config = IPAdapterConfig("linear", image_dim, unet.config.context_dim, num_tokens,
                             [layer.to_k.out_features for layer in layers])
    with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
        torch.manual_seed(seed)
        adapter = IPAdapter(config)
    with torch.no_grad():
        for kv, layer in zip(adapter.ip_adapter.values(), layers):
            kv.to_k_ip.weight.copy_(layer.to_k.weight.float())
            kv.to_v_ip.weight.copy_(layer.to_v.weight.float())
    return adapter


def image_encoder_for(config: IPAdapterTrainConfig, models) -> tuple[nn.Module, bool]:
    """(the image encoder, whether it is a Shapes encoder): the one at ``config.image_encoder``, else a new
    Shapes encoder drawn from the seed."""
    from diffstudio.ipadapter_loading import bundled_shapes_encoder, read_image_encoder
    from diffstudio.models.shapes_image_encoder import ShapesImageEncoder, ShapesImageEncoderConfig

    if config.image_encoder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            encoder = ShapesImageEncoder(ShapesImageEncoderConfig(config.encoder_size, config.encoder_width,
                                                                  config.encoder_dim))
        return encoder, True
    path = Path(config.image_encoder).expanduser()
    shapes = path.is_file() and bundled_shapes_encoder(path)
    return read_image_encoder(path, torch.float32, models.device), shapes


def run_recipe(config: IPAdapterTrainConfig, models, rows, resolution: int, train_encoder: bool) -> dict:
    """What decides what this run learns (``train.recipe``): the data, the base model and a loaded image encoder
    by fingerprint, every setting not in NOT_IN_RECIPE, defaults resolved."""
    from diffstudio.train.recipe import data_fingerprint, model_fingerprint

    base = config.model or models.sources.get(models.family.denoiser_role)
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_RECIPE}
    encoder = model_fingerprint(config.image_encoder) if config.image_encoder else "new Shapes image encoder"
    return {**settings, "data": data_fingerprint(config.data, rows), "model": model_fingerprint(base),
            "image_encoder": encoder, "train_encoder": train_encoder, "family": models.family.name,
            "resolution": resolution}


def _check(config: IPAdapterTrainConfig) -> None:
    from diffstudio.train.loop import OPTIMIZERS

    if config.precision not in ("fp32", "bf16"):
        raise InvalidInputError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
    if config.save_dtype not in SAVE_DTYPES:
        raise InvalidInputError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if config.steps < 1 or config.batch_size < 1 or config.num_tokens < 1:
        raise InvalidInputError("steps, batch_size and num_tokens must be positive")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    for name in ("caption_dropout", "image_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise InvalidInputError(f"{name} is a probability in [0, 1), got {getattr(config, name)}")


def reference_pixels(rows, size: int) -> torch.Tensor:
    """Each training image fitted to the encoder's input as the pipeline fits a reference: uint8 (N, 3, S, S)."""
    from diffstudio.pipeline.ip_adapter import fit_reference

    return torch.stack([fit_reference(path, size) for path, _ in rows])


def train_ip_adapter(config: IPAdapterTrainConfig, models=None, *, stop_after: int | None = None) -> Path | None:
    """Train an IP-Adapter for the base model on ``config.data`` and write it to ``config.out``.

    Resumes from the checkpoint in ``workdir`` when it was trained with the same recipe, raises
    ``StaleRunError`` when not (unless ``config.restart``). A finished run started again only writes its file
    again. ``models``: an already loaded base (left unchanged). ``stop_after`` stops after that many steps of
    this call without writing the file (an interrupted run; the next call resumes). Returns the file, or None
    when stopped early."""
    import diffstudio
    from diffstudio.models.unet import UNetModel
    from diffstudio.pipeline.denoiser import network_fn
    from diffstudio.pipeline.ip_adapter import normalise_reference
    from diffstudio.sampling.prediction import prediction_for
    from diffstudio.train.cache import cache_key, draw_batch, load_or_build_cache, prepare_items
    from diffstudio.train.data import read_captions
    from diffstudio.train.extras import require_train_extra
    from diffstudio.train.loop import discard_checkpoints, train
    from diffstudio.train.objectives import diffusion_loss
    from diffstudio.train.recipe import check_resume

    require_train_extra("accelerate")
    _check(config)
    if models is None:
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        models = diffstudio.load(*([config.model] if config.model else []), dtype=dtype)
    family = models.family
    unet = models.denoiser
    if not isinstance(unet, UNetModel):
        raise IPAdapterMismatchError(f"this {family.name} model's denoiser is a {type(unet).__name__}: diffstudio "
                                     "trains IP-Adapters for LDM UNets (SD 1.x, SDXL)")
    if config.snr_gamma is not None and family.prediction == "flow":
        raise InvalidInputError(f"--snr-gamma weights eps/v training; {family.name} is trained by flow matching")
    encoder, shapes_encoder = image_encoder_for(config, models)
    train_encoder = shapes_encoder and config.image_encoder is None if config.train_encoder is None \
        else config.train_encoder
    if train_encoder and not shapes_encoder:
        raise InvalidInputError("a CLIP image encoder stays frozen in IP-Adapter training (the paper's recipe); "
                                "train_encoder applies to Shapes image encoders")
    size = int(encoder.config.image_size)
    resolution = config.resolution or int({**asdict(family.defaults), **models.defaults}["width"])
    rows = read_captions(config.data)
    recipe = run_recipe(config, models, rows, resolution, train_encoder)
    check_resume(config.work_path(), recipe, restart=config.restart)  # before any work: a stale run stops here

    def build_cache() -> dict:
        data = prepare_items(models, rows, resolution=resolution, buckets=config.buckets,
                             caption_dropout=config.caption_dropout)
        data["references"] = reference_pixels(rows, size)
        return data

    data = load_or_build_cache(config.work_path() / "cache.pt", f"{cache_key(recipe)}-references{size}", build_cache)
    adapter = adapter_for(unet, int(encoder.config.projection_dim), config.num_tokens, config.seed)
    model = AdapterAndEncoder(adapter.to(models.device), encoder.float().requires_grad_(train_encoder))
    prediction = prediction_for(family)
    net_fn = network_fn(models, check_finite=False)

    def loss_fn(model, step):
        idx, gen, x0, cond = draw_batch(data, step, config.seed, config.batch_size, config.caption_dropout)
        pixels = normalise_reference(data["references"][idx]).to(models.device)
        keep = (torch.rand(len(idx), generator=gen) >= config.image_dropout).float().view(-1, 1)
        with torch.set_grad_enabled(train_encoder):
            embeds = model.encoder(pixel_values=pixels).image_embeds.float()          # (B, E)
        tokens = model.adapter(embeds * keep.to(embeds))                              # dropped: the zero embedding
        ip = [[(k.to(models.dtype), v.to(models.dtype), s) for k, v, s in layer]
              for layer in model.adapter.layer_inputs(tokens)]
        return diffusion_loss(prediction, lambda x, t, **c: net_fn(x, t, ip=ip, **c), x0, cond, gen,
                              snr_gamma=config.snr_gamma)

    if config.restart:  # the new run is ready: only now does the old one go
        discard_checkpoints(config.work_path())
    frozen = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)  # gradients flow through the frozen UNet to the image keys and values
    try:
        losses = train(model, loss_fn, steps=config.steps, out_dir=config.work_path(), lr=config.lr,
                       warmup=config.warmup, lr_end=config.lr_end, checkpoint_every=config.checkpoint_every,
                       optimizer=config.optimizer, desc=f"ip-adapter {family.name}", stop_after=stop_after,
                       trainable_only=True, recipe=recipe)
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(frozen[name])
    if len(losses) < config.steps:
        return None
    metadata = {"diffstudio.ip_adapter_training": json.dumps({"config": asdict(config), "recipe": recipe,
                                                              "images": len(rows), "final_loss": losses[-1]})}
    return save_ip_adapter(adapter, family.name, config.out, encoder if shapes_encoder else None,
                           SAVE_DTYPES[config.save_dtype], metadata)


def save_ip_adapter(adapter, family: str, out: str | Path, shapes_encoder: nn.Module | None = None,
                    dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write ``adapter`` in the released names (``image_proj.*``, ``ip_adapter.*``), with a Shapes image encoder
    bundled under ``image_encoder.``; the configs in the metadata (roles ``ip_adapter``, ``image_encoder``),
    atomically."""
    from diffstudio.io.safetensors_file import save_safetensors
    from diffstudio.ipadapter_loading import ROLE, SHAPES_ENCODER_PREFIX
    from diffstudio.save import metadata_for

    def cast(v: torch.Tensor) -> torch.Tensor:
        return v.detach().cpu().to(dtype).contiguous() if v.is_floating_point() else v.detach().cpu()

    tensors = {k: cast(v) for k, v in adapter.state_dict().items()}
    meta = metadata_for(family, {ROLE: (ROLE, adapter.config)}, metadata)
    if shapes_encoder is not None:
        tensors.update({SHAPES_ENCODER_PREFIX + k: cast(v) for k, v in shapes_encoder.state_dict().items()})
        stored = json.loads(meta["diffstudio"])
        stored["configs"]["image_encoder"] = shapes_encoder.config.to_dict()
        meta["diffstudio"] = json.dumps(stored)
    return save_safetensors(tensors, out, meta)
