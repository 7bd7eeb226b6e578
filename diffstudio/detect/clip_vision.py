"""CLIP image encoder (a vision tower with its projection): sentinels in both layouts and the config.

Canonical layout = transformers' ``CLIPVisionModelWithProjection`` (``vision_model.*``, ``visual_projection``), as
in diffusers folders (``image_encoder/``) and h94/IP-Adapter. The other layout is OpenCLIP's ``visual.*`` tower, as
stored in svd.safetensors under ``conditioner.embedders.0.open_clip.model.visual.`` (converted by
``diffstudio.convert.clip_vision``). The config is derived from shapes and the releases' conventions (ViT-H/14:
1280 wide, 32 layers, 16 heads, GELU, projection 1024); the IP-Adapter loader uses the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffstudio.errors import UnknownModelError

VISION_SENTINELS: tuple[str, ...] = (
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "visual_projection.weight",
)

OPENCLIP_VISION_SENTINELS: tuple[str, ...] = (
    "class_embedding",
    "conv1.weight",
    "transformer.resblocks.0.attn.in_proj_weight",
    "proj",
)


def derive_vision_config(sd: Mapping, hints: Mapping | None = None):
    """Canonical state dict (names + shapes) -> transformers ``CLIPVisionConfig``.

    Shapes give the widths, depth, patch and image size. What they cannot give follows the releases' conventions
    unless ``hints`` say otherwise: 16 heads for the 1024-, 1280- and 1664-wide towers (ViT-L/14, OpenCLIP
    ViT-H/14 and ViT-bigG/14), else 64-wide heads; OpenAI's quick_gelu for the 768- and 1024-wide towers, GELU
    otherwise; LayerNorm eps 1e-5.
    """
    from transformers import CLIPVisionConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"the image encoder lacks '{key}': not a CLIP vision tower with a projection "
                                    "(transformers' CLIPVisionModelWithProjection or OpenCLIP's visual.*)")
        return tuple(sd[key].shape)

    hidden = shape("vision_model.embeddings.class_embedding")[0]
    patch = shape("vision_model.embeddings.patch_embedding.weight")[-1]
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    hints = dict(hints or {})
    heads = int(hints.pop("num_attention_heads", 16 if hidden in (1024, 1280, 1664) else hidden // 64))
    if heads < 1 or hidden % heads:
        raise UnknownModelError(f"a {hidden}-wide CLIP vision tower has no head-count convention: pass "
                                "hints={'num_attention_heads': N} (a config stored with the weights carries it)")
    fields = dict(hidden_size=hidden, intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                  projection_dim=shape("visual_projection.weight")[0], num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=round((positions - 1) ** 0.5) * patch, patch_size=patch,
                  hidden_act="quick_gelu" if hidden in (768, 1024) else "gelu", layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**fields, **hints})


def vision_config_from_dict(data: Mapping):
    """A config.json dict (a diffusers ``image_encoder/`` folder, or our stored metadata) -> CLIPVisionConfig."""
    from transformers import CLIPVisionConfig

    data = dict(data)
    if "vision_config" in data:  # a whole CLIPModel's config: the tower's, with the shared projection width
        data = {**data["vision_config"], "projection_dim": data.get("projection_dim", 512)}
    data = {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    return CLIPVisionConfig(**data)
