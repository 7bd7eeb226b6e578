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


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder the family conditions on, and how its output is used."""

    encoder_role: str
    tokenizer_role: str
    tokenizer_data: str  # packaged tokenizer folder under diffstudio/data/tokenizers/
    default_clip_skip: int = 1


@dataclass(frozen=True)
class DiscreteSchedule:
    """The training noise schedule of a discrete-time (DDPM-style) model."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_steps: int = 1000
    kind: str = "scaled_linear"


@dataclass(frozen=True)
class Defaults:
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"


@dataclass(frozen=True)
class Family:
    name: str
    denoiser_role: str
    roles: tuple[Role, ...]
    text_encoders: tuple[TextEncoderSpec, ...]
    latent: LatentFormat
    prediction: str  # "eps" | "v" | "flow"
    schedule: DiscreteSchedule | None
    defaults: Defaults
    # Structural test on the denoiser's derived config: None when it matches, else the reason.
    check_denoiser: Callable[[Any], str | None]
    # Turns encoded prompts into the denoiser's conditioning kwargs (context, y, ...).
    make_conditioning: Callable[..., dict]
    # Extra input channels the denoiser concatenates to the latent (inpainting models: mask + image).
    concat_channels: Callable[[Any], int] = lambda config: 0
    diffusers_pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s that mean this family

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
