"""CLIP vision towers: OpenCLIP's ``visual.*`` layout <-> transformers' ``CLIPVisionModelWithProjection`` (ours).

OpenCLIP (``open_clip.VisionTransformer``) and transformers name the same ViT:

    class_embedding                 (C,)        -> vision_model.embeddings.class_embedding
    conv1.weight                    (C, 3, p, p) -> vision_model.embeddings.patch_embedding.weight (no bias)
    positional_embedding            (N+1, C)    -> vision_model.embeddings.position_embedding.weight
    ln_pre / ln_post                            -> vision_model.pre_layrnorm / post_layernorm
    transformer.resblocks.N.ln_1 / ln_2         -> vision_model.encoder.layers.N.layer_norm1 / 2
    transformer.resblocks.N.attn.in_proj_*  (3C, C) rows [q; k; v] -> self_attn.{q,k,v}_proj.*
    transformer.resblocks.N.attn.out_proj       -> self_attn.out_proj
    transformer.resblocks.N.mlp.c_fc / c_proj   -> mlp.fc1 / fc2
    proj                            (C, P)      -> visual_projection.weight (P, C): OpenCLIP computes x @ W

The fused ``in_proj`` is ``nn.MultiheadAttention``'s, which stacks query, key and value along the output rows.
Both directions end in ``check_conversion`` (every key consumed, none missing, shapes equal).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from diffstudio.convert.check import check_conversion

StateDict = dict[str, torch.Tensor]

_TOP = {"class_embedding": "vision_model.embeddings.class_embedding",
        "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # in_proj_weight: "_"
_LAYER_KEY = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def vision_from_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenCLIP ``visual.*`` tower (its prefix stripped) -> transformers CLIPVisionModelWithProjection keys."""
    out: StateDict = {}
    consumed: list[str] = []
    for key, tensor in sd.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif key == "proj":
            out["visual_projection.weight"] = tensor.t()
        elif (m := _BLOCK_KEY.match(key)) is not None:
            index, module, param = m.groups()
            layer = f"vision_model.encoder.layers.{index}"
            if module == "attn.in_proj":
                for name, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{layer}.self_attn.{name}_proj.{param}"] = part
            elif module in _BLOCK:
                out[f"{layer}.{_BLOCK[module]}.{param}"] = tensor
            else:
                continue
        else:
            continue
        consumed.append(key)
    check_conversion("OpenCLIP -> transformers CLIP vision tower", sd.keys(), consumed, out, _expected(out))
    return out


def _expected(out: StateDict) -> dict:
    """Names and shapes of the model the converted keys describe (built on the meta device)."""
    from diffstudio.detect.clip_vision import derive_vision_config

    with torch.device("meta"):
        model = build_vision_model(derive_vision_config(out, {"num_attention_heads": 1}))  # heads: no name/shape
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def vision_to_openclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers CLIPVisionModelWithProjection keys -> OpenCLIP's ``visual.*`` names (the inverse)."""
    top = {ours: theirs for theirs, ours in _TOP.items()}
    block = {ours: theirs for theirs, ours in _BLOCK.items()}
    out: StateDict = {}
    consumed: list[str] = []
    for key, tensor in sd.items():
        if key in top:
            out[top[key]] = tensor
        elif key == "visual_projection.weight":
            out["proj"] = tensor.t().contiguous()
        elif (m := _LAYER_KEY.match(key)) is not None:
            index, module, param = m.groups()
            resblock = f"transformer.resblocks.{index}"
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":  # the three are written together, once
                    parts = [sd[f"vision_model.encoder.layers.{index}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"{resblock}.attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            elif module in block:
                out[f"{resblock}.{block[module]}.{param}"] = tensor
            else:
                continue
        else:
            continue
        consumed.append(key)
    check_conversion("transformers -> OpenCLIP CLIP vision tower", sd.keys(), consumed, out)
    return out


def to_canonical_vision(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Either layout -> canonical (transformers); a ``position_ids`` buffer is dropped (not a weight)."""
    if "vision_model.embeddings.class_embedding" in sd:
        return {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    return vision_from_openclip(sd)


def build_vision_model(config):
    """config -> CLIPVisionModelWithProjection (on the current default device, meta included), eval mode."""
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(config).eval()
