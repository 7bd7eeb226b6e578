"""Adding a ControlNet to a loaded model: `add_controlnet(models, path) -> ControlNetModel`.

``read_controlnet`` reads every ControlNet architecture (``detect.controlnet.CONTROLNET_ARCHS``); a family
whose denoiser is no LDM UNet adds its own through ``Family.controlnet_loader`` (FLUX:
``flux_controlnet_loading.py``, SD3: ``sd3_controlnet_loading.py``).

A ControlNet comes as a single file (cldm names, bare or under ``control_model.``, or diffusers names;
``.safetensors``, or ``.pth`` / ``.ckpt`` read with torch's weights-only loader) or as a diffusers
``ControlNetModel`` folder (config.json + weights). It is built in the base model's dtype and on its
device, after checking that it fits the base: same family, same text width, same encoder widths, so
that every residual lands on a skip of its shape (docs/controlnet.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffstudio.detect.controlnet import (
    CONTROLNET_ARCHS,
    ROLE,
    derive_controlnet_config,
    detect_dit_controlnet,
    dit_controlnet_arch,
    find_controlnet,
    place_controlnet,
    union_variant,
)
from diffstudio.errors import ControlNetMismatchError, UnknownModelError
from diffstudio.models.controlnet import ControlNetConfig, ControlNetModel
from diffstudio.models.unet import UNetConfig


def _top_keys(sd) -> str:
    heads: dict[str, int] = {}
    for k in sd:
        heads[k.split(".")[0]] = heads.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{h}.* ({n})" for h, n in sorted(heads.items(), key=lambda kv: -kv[1])[:6])


# Read through CONTROLNET_ARCHS (ControlNetUnionModel: the "controlnet" architecture with a union path); SD3's:
# DIT_CONTROLNETS.
CONTROLNET_CLASSES = ("ControlNetModel", "ControlNetUnionModel", "FluxControlNetModel")


def is_controlnet_folder(folder: Path) -> bool:
    """A diffusers ControlNet folder of a class we load (its config.json names the class); no weights are read."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return name in CONTROLNET_CLASSES or dit_controlnet_arch(name) is not None


def read_controlnet(path: str | Path, hints: dict | None = None, dit_hints: dict | None = None):
    """A ControlNet file or diffusers folder -> (Detection naming its family, the loader's part in canonical
    names: cldm's for a UNet ControlNet, ``convert.flux_controlnet``'s for a FLUX one, ``convert.sd3_controlnet``'s
    for an SD3 one).

    ``hints``: conventions shapes cannot reveal (heads, norm groups), e.g. the base UNet's (FLUX: the base's RoPE
    split); ``dit_hints`` the same for an SD3 ControlNet (the base MMDiT's heads). A stored config (the folder's
    config.json, or diffstudio's safetensors metadata) wins over them."""
    from diffstudio.components import ARCHS
    from diffstudio.detect import Component, Detection, parameter_count, storage_dtype, stored_configs
    from diffstudio.io.folders import existing_path, read_component
    from diffstudio.io.state_dict import read_file_metadata, read_state_dict
    from diffstudio.loader import Part, canonical_state_dict

    path = existing_path(path, "ControlNet")
    if path.is_dir():
        sd, config_json = read_component(path)
        dit = dit_controlnet_arch((config_json or {}).get("_class_name"))
        if dit is not None:  # an SD3 ControlNet: its own architecture, its family from the class name
            arch = ARCHS[dit[1]]
            canonical = arch.to_canonical(sd)
            component = Component(ROLE, dit[1], "", "original" if arch.is_canonical(sd) else arch.other_layout,
                                  arch.config_from_diffusers(config_json), parameter_count(canonical),
                                  storage_dtype(canonical))
            return Detection(dit[0], {ROLE: component}), Part(canonical, component.config, str(path))
        arch = next((ARCHS[a] for a in CONTROLNET_ARCHS if ARCHS[a].is_canonical(sd) or ARCHS[a].is_diffusers(sd)),
                    None)
        if arch is None:
            raise UnknownModelError(f"{path} holds no ControlNet weights; its top-level keys: {_top_keys(sd)}")
        canonical = arch.to_canonical(sd)
        stored = {ROLE: arch.config_to_dict(arch.config_from_diffusers(config_json))} if config_json else {}
        component = Component(ROLE, arch.name, "", "original" if arch.is_canonical(sd) else "diffusers", None,
                              parameter_count(canonical), storage_dtype(canonical))
        family, config = place_controlnet(arch.name, canonical, stored, hints)
    else:
        sd = read_state_dict(path)
        stored = stored_configs(read_file_metadata(path))
        found = find_controlnet(sd, stored, hints)
        dit = detect_dit_controlnet(sd, stored) if found is None else None
        if dit is not None:  # an SD3 ControlNet
            component = dit.components[ROLE]
            canonical = canonical_state_dict({k: v for k, v in sd.items() if k not in dit.ignored}, component)
            if dit_hints and ROLE not in stored:
                component.config = ARCHS[component.arch].derive_config(canonical, dit_hints)
            return dit, Part(canonical, component.config, str(path))
        if found is None:
            raise UnknownModelError(f"{path} holds no ControlNet: no cldm input_hint_block / zero_convs keys (bare or "
                                    "under 'control_model.'), no diffusers controlnet_cond_embedding keys, no FLUX "
                                    "ControlNet keys (controlnet_x_embedder), no SD3 ControlNet keys "
                                    "(pos_embed_input, controlnet_blocks) and no Hunyuan-DiT ControlNet keys "
                                    f"(before_proj, after_proj_list). Its top-level keys: {_top_keys(sd)}. "
                                    f"`diffstudio info {path}` says what it is.")
        component, family = found
        canonical = canonical_state_dict(sd, component)
        config = component.config
    if hints and ROLE not in stored and component.arch == ROLE:  # a UNet ControlNet: the base UNet's conventions
        config = derive_controlnet_config(canonical, hints)
    component.config = config
    return Detection(family.name, {ROLE: component}, union_variant(config)), Part(canonical, config, str(path))


def fit_problems(controlnet: ControlNetConfig, unet: UNetConfig, latent_channels: int) -> list[str]:
    """Why a ControlNet's residuals would not fit a UNet (empty when they do)."""
    problems = []
    if controlnet.in_channels != latent_channels:
        problems.append(f"it takes {controlnet.in_channels}-channel latents, the model's are {latent_channels}")
    if controlnet.context_dim != unet.context_dim:
        problems.append(f"its text width (cross-attention context) is {controlnet.context_dim}, the UNet's "
                        f"{unet.context_dim}")
    encoder = ("model_channels", "channel_mult", "num_res_blocks")
    if any(getattr(controlnet, f) != getattr(unet, f) for f in encoder):
        problems.append("its encoder widths (" + ", ".join(f"{f}={getattr(controlnet, f)}" for f in encoder) +
                        ") are not the UNet's (" + ", ".join(f"{f}={getattr(unet, f)}" for f in encoder) + ")")
    if controlnet.adm_in_channels is not None and controlnet.adm_in_channels != unet.adm_in_channels:
        problems.append(f"it takes a vector condition y of width {controlnet.adm_in_channels}, the UNet's is "
                        f"{unet.adm_in_channels}")
    return problems


def add_controlnet(models, path: str | Path) -> ControlNetModel:
    """Load the ControlNet at ``path`` for ``models`` (a loaded `Models`): in its dtype, on its device, checked
    to fit its UNet (`ControlNetMismatchError` otherwise). The model itself is not changed."""
    from diffstudio.loader import build_component

    unet = getattr(models.denoiser, "config", None)
    if not isinstance(unet, UNetConfig):
        if models.family.controlnet_loader:  # a DiT family's own ControlNets
            import importlib

            module, name = models.family.controlnet_loader.split(":")
            return getattr(importlib.import_module(module), name)(models, path)
        raise ControlNetMismatchError(f"diffstudio has no ControlNets for {models.family.name} models (their "
                                      "denoiser is not an LDM UNet and the family names no ControlNet loader)")
    hints = {"num_heads": unet.num_heads, "num_head_channels": unet.num_head_channels, "norm_groups": unet.norm_groups}
    detection, part = read_controlnet(path, hints)
    if detection.family != models.family.name:
        raise ControlNetMismatchError(f"{path} is a ControlNet for {detection.family} models, the loaded model is "
                                      f"{models.family.name}: use a ControlNet made for {models.family.name}")
    problems = fit_problems(part.config, unet, models.family.latent.channels)
    if problems:
        raise ControlNetMismatchError(f"{path} is a {detection.family} ControlNet that does not fit this model's UNet: "
                                      + "; ".join(problems) + ". It was made for another base architecture.")
    return build_component(ROLE, ROLE, part, models.dtype, models.device, consume=True)


def refuse_as_model(path, detection) -> None:
    """A lone ControlNet passed to `diffstudio.load` (as the base or a component): say how to add it."""
    if set(detection.components) == {ROLE}:
        raise UnknownModelError(f"{path} is a ControlNet for {detection.family} models, not a model or a component: "
                                "load the base model, then add it with models.add_controlnet(path)")
