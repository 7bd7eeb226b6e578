"""Adding an IP-Adapter to a loaded model: `add_ip_adapter(models, path, image_encoder) -> LoadedIPAdapter`.

An IP-Adapter file (``.bin`` read with torch's weights-only loader, or ``.safetensors``; docs/ipadapter.md) is
built in the model's dtype and on its device after checking that it fits the UNet (one projection pair per
cross-attention layer, of that layer's width, reading tokens of the UNet's text width), or, for XLabs' FLUX
layout (models/flux_ipadapter.py), the FLUX transformer (one pair per double block). Its image encoder is
transformers' ``CLIPVisionModelWithProjection``: a folder (config.json + weights) or a single weights file,
by default the ``image_encoder/`` folder beside the adapter file (h94/IP-Adapter's layout). The encoder must
give the features the adapter reads: ViT-H/14 for the SD 1.5 adapters and the SDXL ``*_vit-h`` ones,
ViT-bigG/14 for ip-adapter_sdxl, ViT-L/14-336 for Kolors' IP-Adapter-Plus, ViT-L/14 for XLabs' FLUX adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffstudio.errors import IPAdapterMismatchError, UnknownModelError
from diffstudio.models.ipadapter import IPAdapter, IPAdapterConfig

ROLE = "ip_adapter"
FLUX_ARCH = "flux_ip_adapter"  # XLabs' layout; the UNet adapters' architecture is named like the role
ENCODER_PREFIXES = ("vision_model.", "visual_projection.")
ADAPTER_PREFIXES = ("image_proj.", "ip_adapter.")
FLUX_ADAPTER_PREFIXES = ("ip_adapter_proj_model.", "double_blocks.")
SHAPES_ENCODER_PREFIX = "image_encoder."  # a Shapes image encoder bundled in its adapter's file
SHAPES_ENCODER_SENTINELS = ("pixel.0.weight", "pixel.2.weight", "proj.weight")


@dataclass
class LoadedIPAdapter:
    """An IP-Adapter with the image encoder that feeds it, as `models.add_ip_adapter` returns it."""

    adapter: IPAdapter  # or FluxIPAdapter (XLabs' FLUX layout)
    image_encoder: nn.Module  # transformers CLIPVisionModelWithProjection
    source: str
    encoder_source: str

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.config.image_size)


# -- the adapter -----------------------------------------------------------------------------------

def read_ip_adapter(path: str | Path) -> tuple[dict, IPAdapterConfig]:
    """An IP-Adapter file -> (state dict in the released names, config). A config stored in the file's
    safetensors metadata wins over the one derived from shapes."""
    from diffstudio.components import ARCHS
    from diffstudio.detect import stored_configs
    from diffstudio.detect.ipadapter import is_ip_adapter
    from diffstudio.io.folders import existing_path
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict

    path = existing_path(path, "IP-Adapter")
    whole = read_state_dict(path)
    arch = adapter_arch(whole)
    prefixes = FLUX_ADAPTER_PREFIXES if arch == FLUX_ARCH else ADAPTER_PREFIXES
    sd = {k: v for k, v in whole.items() if k.startswith(prefixes)}  # a bundled encoder is read apart
    if arch == ROLE and not is_ip_adapter(sd):
        heads = sorted({k.split(".")[0] for k in whole})[:6]
        raise UnknownModelError(f"{path} is not an IP-Adapter: no ip_adapter.1.to_k_ip / to_v_ip weights, nor "
                                f"XLabs' FLUX ip_adapter_proj_model (its top-level keys: {heads}). "
                                f"`diffstudio info {path}` says what it is.")
    stored = stored_configs(read_file_metadata(path)) if path.is_file() else {}
    config = ARCHS[arch].config_from_dict(stored[ROLE]) if ROLE in stored else ARCHS[arch].derive_config(sd)
    return sd, config


def adapter_arch(sd) -> str:
    """Which IP-Adapter architecture a state dict holds: ``flux_ip_adapter`` (XLabs' FLUX layout) or
    ``ip_adapter`` (the UNet adapters, and anything else: its reader says what is missing)."""
    from diffstudio.detect.ipadapter import is_flux_ip_adapter

    return FLUX_ARCH if is_flux_ip_adapter(sd) else ROLE


# -- the image encoder ------------------------------------------------------------------------------

def derive_image_encoder_config(sd: dict):
    """A CLIPVisionModelWithProjection state dict -> its CLIPVisionConfig, from shapes and the releases'
    conventions (``detect.clip_vision.derive_vision_config``)."""
    from diffstudio.detect.clip_vision import derive_vision_config

    return derive_vision_config(sd)


def _encoder_config_from_json(data: dict):
    from transformers import CLIPVisionConfig

    data = dict(data)
    if "vision_config" in data:  # a whole CLIPModel's config: the tower's own, with the shared projection width
        data = {**data["vision_config"], "projection_dim": data.get("projection_dim", 512)}
    data = {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    return CLIPVisionConfig(**data)


def read_image_encoder(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A CLIPVisionModelWithProjection folder (config.json + weights) or weights file (a config.json beside it is
    used; else the config is derived from shapes) -> the model in ``dtype`` on ``device``, in eval mode."""
    from transformers import CLIPVisionModelWithProjection

    from diffstudio.io.folders import existing_path, read_component, read_component_config
    from diffstudio.io.state_dict import read_state_dict
    from diffstudio.loader import assign_weights

    path = existing_path(path, "image encoder")
    if path.is_file() and bundled_shapes_encoder(path):
        return read_shapes_encoder(path, dtype, device)
    if path.is_dir():
        sd, config_json = read_component(path)
    else:
        sd, config_json = read_state_dict(path), read_component_config(path.parent)
    sd = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES) and not k.endswith("position_ids")}
    config = _encoder_config_from_json(config_json) if config_json else derive_image_encoder_config(sd)
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    return assign_weights(encoder, sd, device, f"{path} is not a CLIPVisionModelWithProjection")


def bundled_shapes_encoder(path: Path) -> bool:
    """Whether the file holds a Shapes image encoder (``image_encoder.pixel.*``, ``image_encoder.proj.*``)."""
    from diffstudio.io.state_dict import read_state_dict

    keys = read_state_dict(path).keys()
    return all(SHAPES_ENCODER_PREFIX + k in keys for k in SHAPES_ENCODER_SENTINELS)


def read_shapes_encoder(path: Path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """The Shapes image encoder in ``path`` (models/shapes_image_encoder.py): its config from the file's metadata
    (role ``image_encoder``), else its widths from shapes and the default input size."""
    from diffstudio.detect import stored_configs
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict
    from diffstudio.loader import assign_weights
    from diffstudio.models.shapes_image_encoder import ShapesImageEncoder, ShapesImageEncoderConfig

    n = len(SHAPES_ENCODER_PREFIX)
    sd = {k[n:]: v for k, v in read_state_dict(path).items() if k.startswith(SHAPES_ENCODER_PREFIX)}
    stored = stored_configs(read_file_metadata(path))
    if "image_encoder" in stored:
        config = ShapesImageEncoderConfig.from_dict(stored["image_encoder"])
    else:
        width, embed = sd["proj.weight"].shape[1], sd["proj.weight"].shape[0]
        config = ShapesImageEncoderConfig(hidden_size=width, projection_dim=embed)
    with torch.device("meta"):
        encoder = ShapesImageEncoder(config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    return assign_weights(encoder, sd, device, f"{path} holds no whole Shapes image encoder")


def encoder_problem(adapter: IPAdapterConfig, encoder_config) -> str | None:
    """Why the encoder's features are not the adapter's input, or None."""
    if adapter.image_features == "image_embeds":
        given, what = int(encoder_config.projection_dim), "image embeddings (projection_dim)"
    else:
        given, what = int(encoder_config.hidden_size), "hidden states (hidden_size)"
    if given == adapter.image_dim:
        return None
    return (f"the adapter reads {adapter.image_dim}-wide {what}, the image encoder gives {given}-wide ones. Use the "
            "encoder it was trained with: ViT-H/14 (models/image_encoder) for the SD 1.5 adapters and the SDXL "
            "*_vit-h ones, ViT-bigG/14 (sdxl_models/image_encoder) for ip-adapter_sdxl, ViT-L/14-336 "
            "(Kolors-IP-Adapter-Plus/image_encoder) for Kolors' Plus adapter, ViT-L/14 "
            "(openai/clip-vit-large-patch14) for XLabs' FLUX adapter")


# -- adding it to a model ---------------------------------------------------------------------------

def default_image_encoder(path: Path) -> Path:
    folder = path.parent / "image_encoder"
    if not folder.is_dir():
        raise IPAdapterMismatchError(f"{path} needs an image encoder and there is no image_encoder/ folder beside it: "
                                     "pass image_encoder= (a CLIPVisionModelWithProjection folder or file)")
    return folder


def add_ip_adapter(models, path: str | Path, image_encoder: str | Path | nn.Module | None = None) -> LoadedIPAdapter:
    """Load the IP-Adapter at ``path`` and its image encoder for ``models`` (in its dtype, on its device), checked to
    fit its UNet and each other (`IPAdapterMismatchError` otherwise). The model itself is not changed."""
    from diffstudio.components import ARCHS
    from diffstudio.loader import Part, build_component

    path = Path(path).expanduser()
    sd, config = read_ip_adapter(path)
    arch = adapter_arch(sd)
    refuse_other_base(models, path, arch)
    with torch.device("meta"):
        reason = ARCHS[arch].build(config).mismatch(models.denoiser)
    if reason:
        what = "FLUX transformer" if arch == FLUX_ARCH else "UNet"
        raise IPAdapterMismatchError(f"{path} does not fit this {models.family.name} model's {what}: {reason}. It "
                                     "was made for another base architecture (SD 1.5 adapters for SD 1.x, SDXL ones "
                                     "for SDXL, XLabs' FLUX adapter for FLUX.1).")
    if isinstance(image_encoder, nn.Module):
        encoder, encoder_source = image_encoder, type(image_encoder).__name__
    else:
        if image_encoder is not None:
            encoder_path = Path(image_encoder).expanduser()
        else:  # the encoder bundled in the adapter's file (the Shapes adapter), else image_encoder/ beside it
            encoder_path = path if bundled_shapes_encoder(path) else default_image_encoder(path)
        encoder = read_image_encoder(encoder_path, models.dtype, models.device)
        encoder_source = str(encoder_path)
    problem = encoder_problem(config, encoder.config)
    if problem:
        raise IPAdapterMismatchError(f"{path} with the image encoder {encoder_source}: {problem}")
    adapter = build_component(ROLE, arch, Part(sd, config, str(path)), models.dtype, models.device, consume=True)
    return LoadedIPAdapter(adapter, encoder, str(path), encoder_source)


def refuse_other_base(models, path: Path, arch: str) -> None:
    """A UNet adapter on a model without an LDM UNet, or XLabs' FLUX adapter on a model without a FLUX
    transformer: `IPAdapterMismatchError` naming both."""
    from diffstudio.models.flux import FluxTransformer
    from diffstudio.models.unet import UNetModel

    denoiser = models.denoiser
    if arch == FLUX_ARCH and not isinstance(denoiser, FluxTransformer):
        raise IPAdapterMismatchError(f"{path} is an IP-Adapter for FLUX.1 (XLabs' layout) and this "
                                     f"{models.family.name} model's denoiser is a {type(denoiser).__name__}: load a "
                                     "FLUX.1 model, or use an IP-Adapter made for this one")
    if arch == ROLE and not isinstance(denoiser, UNetModel):
        hint = (": FLUX.1 takes XLabs' flux-ip-adapter" if isinstance(denoiser, FluxTransformer) else "")
        raise IPAdapterMismatchError(f"this {models.family.name} model's denoiser is a {type(denoiser).__name__}: "
                                     f"{path} is a UNet IP-Adapter (SD 1.x, SDXL, Kolors){hint}")


def refuse_as_model(path, detection) -> None:
    """A lone IP-Adapter passed to `diffstudio.load`: say how to add it."""
    if set(detection.components) == {ROLE}:
        raise UnknownModelError(f"{path} is an IP-Adapter, not a model or a component: load the base model, then "
                                "add it with models.add_ip_adapter(path, image_encoder=...)")
