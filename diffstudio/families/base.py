"""The family record: everything the engine needs to know about one model family.

A family is data (ARCHITECTURE.md, principle 1): which components it has and where
their keys live, the latent format, the prediction type and training schedule,
the text encoders, default settings, and a structural test that tells it apart from
the other families. The pipeline asks the record; it never compares family names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents are scaled for the denoiser: z = (vae_latent - shift) * scale."""

    channels: int
    scale: float
    shift: float = 0.0
    downscale: int = 8  # pixels per latent pixel (and the size multiple an image must have)

    def to_model(self, latent):
        return (latent - self.shift) * self.scale

    def from_model(self, z):
        return z / self.scale + self.shift


@dataclass(frozen=True)
class Role:
    """One component of a family: its name, architecture and where its keys live."""

    name: str  # "unet", "vae", "text_encoder"
    arch: str  # key of diffstudio.components.ARCHS
    prefixes: tuple[str, ...]  # key prefixes in an original-layout single file, most common first
    subfolder: str  # folder in a diffusers/HF layout
    hints: dict = field(default_factory=dict)  # conventions shapes cannot reveal (heads, activation)
    required: bool = True
    # Where the component lies in the authors' own release folder when it is not a diffusers folder
    # (Hunyuan-DiT: "t2i/model/pytorch_model_ema.pt", "t2i/clip_text_encoder"): paths relative to the
    # release's root, a weights file or a component folder, the first that exists wins (loader.py).
    released: tuple[str, ...] = ()
    # The released hidden width, used only to tell two lone files of one architecture apart when a user
    # adds them to a model (SD3's clip_l.safetensors vs clip_g.safetensors), never for detection.
    width: int | None = None


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder the family conditions on, and how its output is used."""

    encoder_role: str
    tokenizer_role: str
    tokenizer_data: str  # a kind in diffstudio.conditioning.tokenizers.TOKENIZERS ("clip", "t5", ...)
    default_clip_skip: int = 1
    max_length: int = 77  # tokens per chunk (CLIP) or in all (T5: 256 / 512, ChatGLM: 256)


@dataclass(frozen=True)
class DiscreteSchedule:
    """The training noise schedule of a discrete-time (DDPM-style) model."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_steps: int = 1000
    kind: str = "scaled_linear"


@dataclass(frozen=True)
class FlowSchedule:
    """The training time of a rectified-flow model (SD3, FLUX): t = sigma * multiplier.

    ``shift`` is the static timestep shift (SD3: 3.0). With ``dynamic_shift`` (FLUX dev) the
    shift is exp(mu) instead, mu linear in the number of image tokens between
    (base_seq, base_shift) and (max_seq, max_shift); an image token covers ``patch`` x ``patch``
    latent pixels.
    """

    shift: float = 1.0
    multiplier: float = 1000.0
    dynamic_shift: bool = False
    base_seq: int = 256
    max_seq: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch: int = 2

    def shift_for(self, latent_height: int, latent_width: int) -> float:
        if not self.dynamic_shift:
            return self.shift
        import math

        from diffstudio.sampling.schedules import flux_mu

        tokens = (latent_height // self.patch) * (latent_width // self.patch)
        return math.exp(flux_mu(tokens, self.base_seq, self.max_seq, self.base_shift, self.max_shift))


@dataclass(frozen=True)
class Defaults:
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    guidance: float | None = None  # distilled guidance (FLUX dev) the denoiser takes as an input


@dataclass(frozen=True)
class Family:
    name: str
    denoiser_role: str
    roles: tuple[Role, ...]
    text_encoders: tuple[TextEncoderSpec, ...]
    latent: LatentFormat
    prediction: str  # "eps" | "v" | "flow"
    schedule: DiscreteSchedule | FlowSchedule | None
    defaults: Defaults
    # Structural test on the denoiser's derived config: None when it matches, else the reason.
    check_denoiser: Callable[[Any], str | None]
    # (models, prompts, *, clip_skip, width, height, guidance) -> the denoiser's conditioning kwargs
    # (context, y, ...). Tensors are batched along dim 0, one row per prompt.
    make_conditioning: Callable[..., dict]
    # Extra input channels the denoiser concatenates to the latent (inpainting models: mask + image).
    concat_channels: Callable[[Any], int] = lambda config: 0
    diffusers_pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s that mean this family
    # How the pipeline calls the denoiser network: (net, x, t, cond) -> output shaped like x. None
    # means net(x, t, **cond) (the LDM UNet). DiTs use it to keep their original forward (FLUX packs
    # 2x2 latent patches into tokens and passes position ids).
    call_denoiser: Callable[..., Any] | None = None
    # Which denoiser layers a LoRA trains by default: a regex over module names (Linear and 1x1 Conv
    # layers only). The default takes every attention and MLP projection inside the blocks.
    lora_targets: str = r".*blocks?\.\d+\..*(attn|attention|mlp|ff|linear1|linear2|proj|qkv|to_q|to_k|to_v|to_out).*"

    # Variants told apart by the denoiser's structure (FLUX dev / schnell): config -> variant name or
    # None, and per variant the fields of this record that differ (schedule, defaults, text_encoders).
    # The loader hands the pipeline ``family.for_variant(detection.variant)``, so nothing else asks.
    variant_of: Callable[[Any], str | None] = lambda config: None
    variants: dict[str, dict] = field(default_factory=dict)
    # The noise schedule the family's AnimateDiff motion modules were trained with, used in place of
    # ``schedule`` while a motion module is loaded (``for_motion``); None: the family's own schedule.
    motion_schedule: DiscreteSchedule | None = None
    # The pipeline that runs this family when the image Pipeline cannot (CogVideoX: 5-D video latents), as
    # "module:Class"; the image Pipeline refuses such a model with a message naming it.
    own_pipeline: str | None = None
    # The loader of a family whose parts the generic loader cannot assemble (SVD: the VAE's encoder is the
    # conditioner's, add-ons are ExVideo grafts), as "module:function(path, *extra_paths, dtype=, device=)".
    own_loader: str | None = None
    # How a ControlNet is added to a model whose denoiser is not an LDM UNet (DiT ControlNets), as
    # "module:function(models, path) -> module"; None: only UNet ControlNets (controlnet_loading.py).
    controlnet_loader: str | None = None
    # The LoRA trainer of a family whose training data the image trainer (train/lora.py) cannot prepare
    # (CogVideoX: clips through a 3D VAE), as "module:function(config, models, *, stop_after, snapshot)";
    # ``train_lora`` hands such a model to it. None: the image trainer.
    lora_trainer: str | None = None

    def variant_from(self, denoiser_config) -> str | None:
        """The variant a denoiser of this structure is: "inpaint" when it takes extra input channels,
        else what ``variant_of`` says."""
        return "inpaint" if self.concat_channels(denoiser_config) else self.variant_of(denoiser_config)

    def for_variant(self, variant: str | None) -> Family:
        """This record with the overrides of ``variant`` applied (itself when it has none)."""
        from dataclasses import replace

        overrides = self.variants.get(variant or "", {})
        return replace(self, **overrides) if overrides else self

    def for_motion(self) -> Family:
        """This record as an AnimateDiff run sees it: ``motion_schedule`` in place of ``schedule``."""
        from dataclasses import replace

        return replace(self, schedule=self.motion_schedule) if self.motion_schedule is not None else self

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"family {self.name!r} has no component {name!r}")


def clip_config_from_json(config_json: dict):
    """A transformers CLIPTextConfig from a config.json dict (HF folder) or our stored metadata."""
    from transformers import CLIPTextConfig

    data = {k: v for k, v in config_json.items() if not k.startswith("_")}
    data.pop("architectures", None)
    return CLIPTextConfig(**data)
