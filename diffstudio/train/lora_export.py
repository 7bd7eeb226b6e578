"""Write trained LoRA adapters in the formats other tools read.

* kohya (default; what A1111, ComfyUI, Forge and diffusers' ``load_lora_weights`` read):
  ``lora_unet_<module path with "_">.lora_down.weight`` (A), ``.lora_up.weight`` (B) and
  ``.alpha``; the update is (alpha / rank) * up @ down. The module path is the diffusers one for
  LDM UNets (SD 1.x, SDXL: kohya's sd-scripts trains on diffusers modules) and the original
  release's for DiTs (FLUX, SD3, Hunyuan-DiT); the component architecture says which
  (``ComponentArch.kohya_layout``). ``ss_*`` training metadata is stored like sd-scripts does.
* peft (diffusers' own LoRA format): ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight``
  for UNets (``transformer.`` for DiTs) with alpha / rank folded into B. A layer that diffusers splits
  (FLUX's and SD3's fused ``qkv``, FLUX's ``linear1``, Hunyuan's ``Wqkv`` / ``kv_proj``) becomes one
  adapter per part: the same A, and the rows of B that produce that part's output rows. Where our canonical
  names are diffusers' (CogVideoX, whose other layout is DiffSynth-Studio's) they are written as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstudio.errors import InvalidInputError


def _module_names_in(models, role: str, layout: str, modules: list[str]) -> dict[str, str]:
    """Our module names -> their names in ``layout`` ("original" = ours, "diffusers" via the converter)."""
    if layout == "original":
        return {m: m for m in modules}
    from diffstudio.components import ARCHS

    arch = ARCHS[models.family.role(role).arch]
    module = models.components[role]
    # Convert a meta copy of the state dict: the converter renames keys and keeps the tensor
    # objects, so each of our keys is found again in its output by identity.
    meta = {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}
    converted = arch.to_diffusers(meta, models.configs[role])
    name_of = {id(t): k for k, t in converted.items()}
    out = {}
    for m in modules:
        key = name_of.get(id(meta.get(f"{m}.weight")))
        if key is None:
            raise InvalidInputError(f"{m} has no {layout} name; export this LoRA with export_format='peft'")
        out[m] = key[: -len(".weight")]
    return out


def _diffusers_parts(models, role: str, modules: list[str]) -> dict[str, list[tuple[str, slice | torch.Tensor | None]]]:
    """Our module names -> [(diffusers module name, the rows of our weight it holds (None: all))].

    The converter runs on a state dict whose tensors encode their origin (``patches.names``), so a
    split (FLUX's qkv -> to_q, to_k, to_v) is seen as row ranges of one of our weights."""
    from diffstudio.components import ARCHS
    from diffstudio.patches.names import _decode, _encode

    arch = ARCHS[models.family.role(role).arch]
    sd = models.components[role].state_dict()
    sizes = {k: (v.shape[0] if v.ndim else 1) for k, v in sd.items()}
    encoded, starts, names = _encode(sd)
    converted = arch.to_diffusers(encoded, models.configs[role])
    parts: dict[str, list] = {m: [] for m in modules}
    for key, tensor in converted.items():
        target = _decode(tensor, starts, names, sizes) if key.endswith(".weight") else None
        if target is not None and target.param.endswith(".weight") and target.param[: -len(".weight")] in parts:
            parts[target.param[: -len(".weight")]].append((key[: -len(".weight")], target.rows))
    for m, found in parts.items():
        covered = torch.zeros(sizes[f"{m}.weight"], dtype=torch.bool)
        for _, rows in found:
            covered[slice(None) if rows is None else rows] = True
        if not covered.all():  # a part of the layer diffusers has no layer for: the file would lose it
            raise InvalidInputError(f"{m} has no complete diffusers counterpart; export this LoRA with "
                                    "export_format='kohya'")
    return parts


def save_lora(models, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, out: str | Path,
              export_format: str = "kohya", metadata: dict | None = None) -> Path:
    """``weights``: {denoiser module name: (A, B)} -> a .safetensors LoRA file.

    Written atomically (a temporary file in the same folder, renamed over ``out`` once complete, with the
    mode the umask gives), so a failed export leaves an existing file as it was."""
    from diffstudio.components import ARCHS
    from diffstudio.io.safetensors_file import save_safetensors

    family = models.family
    role = family.denoiser_role
    arch = ARCHS[family.role(role).arch]
    tensors: dict[str, torch.Tensor] = {}
    if export_format == "kohya":
        names = _module_names_in(models, role, arch.kohya_layout, list(weights))
        for module, (a, b) in weights.items():
            key = "lora_unet_" + names[module].replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = a.contiguous()
            tensors[f"{key}.lora_up.weight"] = b.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    elif export_format == "peft":
        if arch.other_layout == "diffusers":
            parts = _diffusers_parts(models, role, list(weights))
        else:  # our canonical names are diffusers' already (CogVideoX; the converter goes to DiffSynth's names)
            parts = {module: [(module, None)] for module in weights}
        prefix = "unet" if role == "unet" else "transformer"
        for module, (a, b) in weights.items():
            rank = a.shape[0]
            for name, rows in parts[module]:
                tensors[f"{prefix}.{name}.lora_A.weight"] = a.clone()  # safetensors refuses shared memory
                part = b if rows is None else b[rows]
                tensors[f"{prefix}.{name}.lora_B.weight"] = (part * (alpha / rank)).contiguous()
    else:
        raise InvalidInputError(f"unknown LoRA export format {export_format!r}; use 'kohya' or 'peft'")
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    meta["diffstudio.lora_format"] = export_format
    return save_safetensors({k: v.to(torch.float32) for k, v in tensors.items()}, out, metadata=meta)
