"""Write a model as one original-layout single file, with its configs in the metadata.

The layout is the one people download (LDM prefixes for SD 1.x), so the file loads in
other tools too; the stored configs make diffstudio re-load it without guessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstudio.components import ARCHS


def component_state_dict(role_arch: str, module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A component's weights in the names its place in a single file uses.

    CLIP text encoders under an OpenCLIP prefix (``conditioner.embedders.1.model.`` in SDXL,
    ``cond_stage_model.model.`` in SD 2.x: the ``model`` attribute of an open_clip embedder) are
    stored in OpenCLIP's names, as the released files do; the others in transformers' names.
    """
    sd = module.state_dict()
    if role_arch == "clip_text":
        from diffstudio.convert.clip import canonical_clip_keys, clip_to_openclip

        sd = canonical_clip_keys(sd)
        if prefix.endswith(".model."):
            sd = clip_to_openclip(sd)
    return sd


def metadata_for(family: str, configs: dict[str, tuple[str, object]], extra: dict | None = None,
                 defaults: dict | None = None) -> dict[str, str]:
    """{role: (arch, config)} -> safetensors metadata with a JSON ``diffstudio`` entry."""
    stored = {role: ARCHS[arch].config_to_dict(cfg) for role, (arch, cfg) in configs.items()}
    data = {"family": family, "configs": stored, "defaults": defaults or {}}
    return {"diffstudio": json.dumps(data), **(extra or {})}


def save_single_file(models, path: str | Path, dtype: torch.dtype | None = None,
                     extra_metadata: dict | None = None) -> Path:
    from diffstudio.io.safetensors_file import save_safetensors

    models.activate()  # this model's own patches in the shared weights (a clone's may be there after a run)
    family = models.family
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for role in family.roles:
        if role.name not in models.components:
            continue
        prefix = role.prefixes[0]
        sd = component_state_dict(role.arch, models.components[role.name], prefix)
        for k, v in sd.items():
            if k.endswith("position_ids"):
                continue
            v = v.detach().cpu()
            tensors[prefix + k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        configs[role.name] = (role.arch, models.configs[role.name])
    path = Path(path)
    save_safetensors(tensors, path, metadata_for(family.name, configs, extra_metadata, models.defaults))
    return path
