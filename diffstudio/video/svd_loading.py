"""Loading Stable Video Diffusion: ``load_svd(path) -> SVDModels`` from svd.safetensors / svd_xt.safetensors or a
diffusers folder (``unet/``, ``vae/``, ``image_encoder/``).

Single files (families/svd.py lists where each part lives): the VAE's decoder comes from ``first_stage_model.``;
its encoder and ``quant_conv`` from ``conditioner.embedders.3.encoder.`` when the file has them (the encoder the
release conditions on the first frame with), else the first stage's own encoder without quant_conv. The image
encoder is OpenCLIP's ViT-H/14 tower, converted to transformers' CLIPVisionModelWithProjection. The UNet is built
by the ``svd_unet`` component architecture; a UNet module may also be passed in (``unet=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffstudio.errors import UnknownModelError
from diffstudio.families.base import Family
from diffstudio.families.svd import COND_ENCODER_PREFIX, SVD

# ViT-H/14 conventions shapes cannot reveal (OpenCLIP's GELU, 16 heads) come from the derivation's defaults.
_ROLES = {role.name: role for role in SVD.roles}


@dataclass
class SVDModels:
    unet: nn.Module
    vae: nn.Module
    image_encoder: nn.Module
    family: Family = SVD
    sources: dict = field(default_factory=dict)


def _build(arch_name: str, sd: dict, config, dtype, device) -> nn.Module:
    from diffstudio.components import ARCHS
    from diffstudio.loader import assign_weights

    arch = ARCHS[arch_name]
    with torch.device("meta"):
        module = arch.build(config)
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}
    return assign_weights(module, sd, device, f"the SVD {arch_name}")


def _part(arch_name: str, sd: dict, config_json: dict | None = None):
    from diffstudio.components import ARCHS

    arch = ARCHS[arch_name]
    canonical = arch.to_canonical(sd)
    config = arch.config_from_diffusers(config_json) if config_json else arch.derive_config(canonical, {})
    return canonical, config


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def single_file_parts(sd: dict) -> dict[str, dict]:
    """A released SVD single file -> {role: state dict in the part's own layout} (module docstring)."""
    parts = {name: _sub(sd, role.prefixes[0]) for name, role in _ROLES.items()}
    cond = _sub(sd, COND_ENCODER_PREFIX)
    if "encoder.conv_in.weight" in cond:
        vae = {k: v for k, v in parts["vae"].items() if not k.startswith("encoder.")}
        vae.update({k: v for k, v in cond.items() if k.startswith(("encoder.", "quant_conv."))})
        parts["vae"] = vae
    missing = [name for name, part in parts.items() if not part and name != "unet"]
    if missing:
        raise UnknownModelError(f"not an SVD checkpoint: no {', '.join(missing)} keys under "
                                f"{', '.join(_ROLES[m].prefixes[0] for m in missing)}")
    return parts


def load_svd(path, *extensions, dtype: torch.dtype = torch.float32, device="cpu",
             unet: nn.Module | None = None) -> SVDModels:
    """A single file or diffusers folder -> SVDModels in ``dtype`` on ``device`` (module docstring).

    ``extensions``: ExVideo-SVD files grafted onto the UNet (``exvideo_loading.graft_exvideo``).
    ``diffstudio.load(path, *extensions)`` lands here for a file of the svd family (``Family.own_loader``)."""
    from diffstudio.components import ARCHS
    from diffstudio.io.folders import existing_path, read_component
    from diffstudio.io.state_dict import read_state_dict

    path = existing_path(path, "SVD model")
    if path.is_dir():
        raw = {name: read_component(path / role.subfolder) for name, role in _ROLES.items()
               if (path / role.subfolder).is_dir() and (unet is None or name != "unet")}
    else:
        raw = {name: (part, None) for name, part in single_file_parts(read_state_dict(path)).items()
               if unet is None or name != "unet"}
    built = {}
    for name, (sd, config_json) in raw.items():
        arch = _ROLES[name].arch
        if arch not in ARCHS:
            raise UnknownModelError(f"this diffstudio has no '{arch}' architecture to build the SVD {name}: pass "
                                    f"load_svd(..., {name}=module)")
        canonical, config = _part(arch, sd, config_json)
        built[name] = _build(arch, canonical, config, dtype, device)
    if unet is not None:
        built["unet"] = unet
    missing = [name for name in _ROLES if name not in built]
    if missing:
        raise UnknownModelError(f"{path} lacks the SVD {', '.join(missing)}")
    if extensions:
        from diffstudio.exvideo_loading import graft_exvideo

        for extension in extensions:
            graft_exvideo(built["unet"], read_state_dict(existing_path(extension, "ExVideo extension")))
        built["unet"].to(device=device, dtype=dtype)
    return SVDModels(built["unet"], built["vae"], built["image_encoder"],
                     sources={"path": str(Path(path)), "extensions": [str(e) for e in extensions]})
