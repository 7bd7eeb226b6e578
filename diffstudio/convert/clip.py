"""CLIP text encoder state dicts: every known layout -> the canonical layout, and loading.

Canonical layout = the released Hugging Face layout WITH the ``text_model.`` level::

    text_model.embeddings.token_embedding.weight            (V, C)
    text_model.embeddings.position_embedding.weight         (77, C)
    text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.N.layer_norm{1,2}.{weight,bias}
    text_model.encoder.layers.N.mlp.fc{1,2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                                  (P, C)  only with a projection

Layouts read by ``canonical_clip_keys``:
  * released HF (``text_model.``), as in HF folders and LDM single files;
  * transformers >= 5 ``CLIPTextModel.state_dict()`` (no ``text_model.`` level);
  * any prefix in front of either, e.g. the SD 1.x single file's ``cond_stage_model.transformer.``
    (callers normally strip it; ``transformer.text_model.`` is handled as well);
  * OpenCLIP's text tower (SD 2.x ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``),
    converted by ``clip_from_openclip`` (``clip_to_openclip`` writes it back, e.g. for SDXL single files).
Non-weights (``position_ids``, ``logit_scale``, OpenCLIP's ``attn_mask``) and the vision tower of
a full CLIP model are dropped and *reported* by ``canonical_clip_keys_with_report``.

The installed transformers decides the key names its model expects (4.x keeps ``text_model.``
in ``CLIPTextModel``, 5.x drops it there but keeps it in ``CLIPTextModelWithProjection``):
``to_installed_transformers_layout`` reads them off the model instead of guessing a version.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffstudio.detect.clip import config_wants_projection, has_text_projection
from diffstudio.errors import ConversionError

StateDict = dict[str, torch.Tensor]

_HF_SENTINEL = "embeddings.token_embedding.weight"
_OC_SENTINEL = "positional_embedding"
_PROJECTION = "text_projection.weight"

# Names (after the component prefix) that are not weights of the text encoder.
_NON_WEIGHT_NAMES = {"logit_scale", "attn_mask", "visual_projection.weight"}
_NON_WEIGHT_PREFIXES = ("vision_model.", "visual.")


def canonical_clip_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Any known CLIP text layout -> canonical keys (see the module docstring). Tensors are not copied."""
    return canonical_clip_keys_with_report(sd)[0]


def canonical_clip_keys_with_report(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Like ``canonical_clip_keys``, also returning the original names of the dropped non-weights."""
    if _find_openclip_prefix(sd) is not None:
        return _openclip_to_canonical(sd)
    return _hf_to_canonical(sd)


def clip_from_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenCLIP text tower (any prefix, e.g. ``conditioner.embedders.1.model.``) -> canonical keys.

    OpenCLIP (``open_clip.CLIP``) names and their canonical counterparts:

        token_embedding.weight                       -> text_model.embeddings.token_embedding.weight
        positional_embedding            (77, C)      -> text_model.embeddings.position_embedding.weight
        transformer.resblocks.N.ln_1 / ln_2          -> text_model.encoder.layers.N.layer_norm1 / 2
        transformer.resblocks.N.attn.in_proj_weight  (3C, C) rows [q; k; v] -> self_attn.{q,k,v}_proj.weight
        transformer.resblocks.N.attn.in_proj_bias    (3C,)                  -> self_attn.{q,k,v}_proj.bias
        transformer.resblocks.N.attn.out_proj        -> self_attn.out_proj
        transformer.resblocks.N.mlp.c_fc / c_proj    -> mlp.fc1 / fc2
        ln_final                                     -> text_model.final_layer_norm
        text_projection                 (C, P)       -> text_projection.weight (P, C): OpenCLIP
                                                        computes x @ W, nn.Linear computes x @ W.T
        logit_scale, attn_mask, visual.*             -> dropped

    The fused ``in_proj`` comes from ``nn.MultiheadAttention``, which stacks the query, key and
    value projections along the output dimension in that order.
    """
    return _openclip_to_canonical(sd)[0]


def clip_to_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Canonical keys -> OpenCLIP's text tower names: the inverse of ``clip_from_openclip``.

    This is the layout SDXL single files store their second encoder in
    (``conditioner.embedders.1.model.``). The query, key and value projections are stacked into
    ``attn.in_proj_*`` in that order, and the projection is transposed back to (C, P).
    """
    simple = {  # canonical name -> OpenCLIP name, 1:1
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    block_renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                     "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    canonical = canonical_clip_keys(sd)
    out: StateDict = {}
    unknown: list[str] = []
    for key, tensor in canonical.items():
        if key in simple:
            out[simple[key]] = tensor
        elif key == _PROJECTION:
            out["text_projection"] = tensor.t().contiguous()  # (P, C) -> (C, P): OpenCLIP computes x @ W
        elif key.startswith("text_model.encoder.layers."):
            index, name = key[len("text_model.encoder.layers.") :].split(".", 1)
            module, _, param = name.rpartition(".")
            block = f"transformer.resblocks.{index}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":  # the three are written together, once
                    parts = [canonical[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{param}"]
                             for p in ("q", "k", "v")]
                    out[f"{block}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            elif module in block_renames:
                out[f"{block}{block_renames[module]}.{param}"] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    _raise_unknown(unknown, "canonical CLIP text")
    return out


def to_installed_transformers_layout(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    """Canonical keys -> the names ``model.state_dict()`` uses under the installed transformers.

    Each key is kept if the model has it, else tried without the ``text_model.`` level. Keys that
    match neither are passed through unchanged so that a strict load names them.
    """
    expected = set(model.state_dict().keys())
    out: StateDict = {}
    for key, tensor in sd.items():
        if key not in expected and key.startswith("text_model."):
            stripped = key[len("text_model.") :]
            if stripped in expected:
                key = stripped
        out[key] = tensor
    return out


def build_clip_text_model(
    config: CLIPTextConfig, with_projection: bool | None = None, device: torch.device | str | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised transformers CLIP text model (``device="meta"`` allocates nothing).

    ``with_projection=None`` follows the config: a config derived from weights with a
    ``text_projection`` (or an HF config.json of CLIPTextModelWithProjection, SDXL's text_encoder_2)
    names that class in ``architectures``. ``device=None`` builds on the ambient default device,
    so ``with torch.device("meta"):`` works.
    """
    if with_projection is None:
        with_projection = config_wants_projection(config)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if device is None:
        return cls(config)
    with torch.device(device):
        return cls(config)


def load_clip_text_model(
    sd: Mapping[str, torch.Tensor],
    config: CLIPTextConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build the model for ``config`` and load ``sd`` (any layout ``canonical_clip_keys`` reads) strictly.

    A ``text_projection.weight`` selects ``CLIPTextModelWithProjection``. ``dtype=None`` keeps the
    dtype of the stored token embedding when it is a float type torch computes in, else float32.
    The weights are copied into the model (the caller's tensors are not aliased). Missing keys,
    unexpected keys and shape mismatches raise ``ConversionError``. The model is returned in eval mode.
    """
    canonical = canonical_clip_keys(sd)
    device = torch.device(device or "cpu")
    dtype = dtype or _stored_dtype(canonical)

    # Build on the meta device first: no random initialisation of a 49408 x C embedding.
    model = build_clip_text_model(config, with_projection=has_text_projection(canonical), device="meta")
    mapped = to_installed_transformers_layout(canonical, model)
    _check_against_model(mapped, model)

    persistent = set(model.state_dict().keys())
    transient = [name for name, _ in model.named_buffers() if name not in persistent]
    if all(name.endswith("position_ids") for name in transient):
        model = model.to(dtype=dtype).to_empty(device=device)
        for name in transient:  # to_empty left them uninitialised: position_ids = 0..77-1
            _module_of(model, name).position_ids.copy_(
                torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
            )
    else:  # an unknown non-persistent buffer: let the constructor compute it.
        model = build_clip_text_model(config, has_text_projection(canonical), device=device).to(dtype=dtype)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# HF-style layouts


def _hf_to_canonical(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    roots = sorted({key[: -len(_HF_SENTINEL)] for key in sd if key.endswith(_HF_SENTINEL)})
    roots = [r for r in roots if not r.endswith("vision_model.")]
    if not roots:
        raise ConversionError(
            "Not a CLIP text encoder state dict: no '...embeddings.token_embedding.weight' (HF layout) "
            "and no '...positional_embedding' + 'transformer.resblocks.*' (OpenCLIP layout). "
            "Pass the text encoder's own weights."
        )
    if len(roots) > 1:
        raise ConversionError(
            f"Several CLIP text encoders in one state dict (prefixes {roots}); pass one component at a time."
        )
    root = roots[0]
    # ``root`` ends with "text_model." in the released layout; ``base`` is what precedes it.
    base = root[: -len("text_model.")] if root.endswith("text_model.") else root
    has_level = root != base

    out: StateDict = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in sd.items():
        if not key.startswith(base):
            unknown.append(key)
            continue
        rest = key[len(base) :]
        if _is_non_weight(rest):
            dropped.append(key)
        elif rest == _PROJECTION:
            out[rest] = tensor
        elif has_level and rest.startswith("text_model."):
            out[rest] = tensor
        elif not has_level and rest.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            out["text_model." + rest] = tensor
        else:
            unknown.append(key)
    _raise_unknown(unknown, "HF CLIP text")
    return out, dropped


# --------------------------------------------------------------------------------------------
# OpenCLIP layout


def _find_openclip_prefix(sd: Mapping[str, torch.Tensor]) -> str | None:
    prefixes = [
        key[: -len(_OC_SENTINEL)]
        for key in sd
        if key.endswith(_OC_SENTINEL)
        and key[: -len(_OC_SENTINEL)] + "token_embedding.weight" in sd
        and key[: -len(_OC_SENTINEL)] + "transformer.resblocks.0.attn.in_proj_weight" in sd
    ]
    if len(prefixes) > 1:
        raise ConversionError(
            f"Several OpenCLIP text towers in one state dict (prefixes {prefixes}); pass one at a time."
        )
    return prefixes[0] if prefixes else None


def _openclip_to_canonical(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    prefix = _find_openclip_prefix(sd)
    if prefix is None:
        raise ConversionError(
            "Not an OpenCLIP text tower: expected 'positional_embedding', 'token_embedding.weight' and "
            "'transformer.resblocks.0.attn.in_proj_weight' under one prefix."
        )
    simple = {  # OpenCLIP name (after the prefix) -> canonical name, for 1:1 renames
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    block_renames = {  # inside transformer.resblocks.N.
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    out: StateDict = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in sd.items():
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        rest = key[len(prefix) :]
        if _is_non_weight(rest):
            dropped.append(key)
        elif rest in simple:
            out[simple[rest]] = tensor
        elif rest == "text_projection":
            out[_PROJECTION] = tensor.t().contiguous()  # (C, P) -> (P, C)
        elif rest.startswith("transformer.resblocks."):
            index, name = rest[len("transformer.resblocks.") :].split(".", 1)
            layer = f"text_model.encoder.layers.{index}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if name.endswith("weight") else "bias"
                if tensor.shape[0] % 3:
                    raise ConversionError(f"{key}: first dimension {tensor.shape[0]} is not 3 x width.")
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            else:
                module, _, param = name.rpartition(".")
                if module not in block_renames:
                    unknown.append(key)
                    continue
                out[f"{layer}{block_renames[module]}.{param}"] = tensor
        else:
            unknown.append(key)
    _raise_unknown(unknown, "OpenCLIP text")
    return out, dropped


# --------------------------------------------------------------------------------------------
# helpers


def _is_non_weight(name: str) -> bool:
    return name.endswith("position_ids") or name in _NON_WEIGHT_NAMES or name.startswith(_NON_WEIGHT_PREFIXES)


def _raise_unknown(unknown: list[str], layout: str) -> None:
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ConversionError(
            f"{len(unknown)} key(s) are not part of a {layout} encoder: {shown}. Pass only the text "
            "encoder's weights (strip the checkpoint's component prefix)."
        )


def _check_against_model(mapped: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = [
        f"{k}: file {tuple(mapped[k].shape)} vs model {expected[k]}"
        for k in sorted(set(mapped) & set(expected))
        if tuple(mapped[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}" + (f" (+{len(missing) - 8})" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(
                f"unexpected {unexpected[:8]}" + (f" (+{len(unexpected) - 8})" if len(unexpected) > 8 else "")
            )
        if wrong:
            parts.append(f"shape mismatch {wrong[:8]}")
        raise ConversionError(
            "CLIP text encoder weights do not fit the derived config: " + "; ".join(parts) + ". "
            "Check that the config was derived from these weights (derive_clip_config)."
        )


def _stored_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    tensor = sd.get("text_model.embeddings.token_embedding.weight")
    if tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return tensor.dtype
    return torch.float32


def _module_of(model: torch.nn.Module, buffer_name: str) -> torch.nn.Module:
    module_path = buffer_name.rpartition(".")[0]
    return model.get_submodule(module_path) if module_path else model
