"""Recognise an IP-Adapter file and derive its `IPAdapterConfig` from names and shapes (the UNet adapters'
layout, and XLabs' FLUX layout at the end of this file).

The released files (h94/IP-Adapter) hold two dicts, ``image_proj`` and ``ip_adapter`` (``.bin``, read with
the weights-only loader, whose nested dicts arrive flattened with dotted names), or the same keys flat with
those prefixes (``.safetensors``). Only names and shapes are read (meta tensors work).

What shapes reveal: the projection kind (``proj.weight`` + ``norm``: linear; ``latents``: resampler;
``proj.3``: mlp), the image feature width, the token width and count, and one (text width -> layer width)
pair per cross-attention layer. What they cannot: the resampler's head width, 64 in every release (so heads
= ``to_q`` rows / 64), unless a config stored with the weights says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import UnknownModelError
from diffstudio.models.ipadapter import IPAdapterConfig

IP_ADAPTER_SENTINELS = ("ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight")

_LAYER = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")
_RESAMPLER_LAYER = re.compile(r"^image_proj\.layers\.(\d+)\.0\.to_q\.weight$")


def is_ip_adapter(keys) -> bool:
    return all(k in keys for k in IP_ADAPTER_SENTINELS)


def _refuse_face_id(sd: Mapping) -> None:
    if any(".to_q_lora." in k or k.startswith("image_proj.perceiver_resampler.") for k in sd) or (
            "image_proj.proj.0.weight" in sd and "image_proj.norm.weight" in sd):
        raise UnknownModelError("this is an IP-Adapter FaceID file (InsightFace identity embeddings, LoRA layers): "
                                "diffstudio supports the image-prompt IP-Adapters (ip-adapter_*, ip-adapter-plus_*, "
                                "ip-adapter-full-face_*), not FaceID")


def derive_ip_adapter_config(sd: Mapping, hints: Mapping | None = None) -> IPAdapterConfig:
    """IP-Adapter state dict (``image_proj.*`` + ``ip_adapter.*``) -> IPAdapterConfig. See the module docstring."""
    hints = dict(hints or {})
    _refuse_face_id(sd)
    if not is_ip_adapter(sd):
        raise UnknownModelError(f"not an IP-Adapter: missing {[k for k in IP_ADAPTER_SENTINELS if k not in sd]}")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"IP-Adapter state dict lacks '{key}' (truncated file?)")
        return tuple(sd[key].shape)

    indices = sorted(int(m.group(1)) for k in sd if (m := _LAYER.match(k)))
    if indices != list(range(1, 2 * len(indices), 2)):
        raise UnknownModelError(f"IP-Adapter layers are numbered {indices[:8]}...: expected 1, 3, 5, ... (one per "
                                "cross-attention layer, every attention processor counted)")
    pairs = [shape(f"ip_adapter.{i}.to_k_ip.weight") for i in indices]
    for i in indices:
        if shape(f"ip_adapter.{i}.to_v_ip.weight") != shape(f"ip_adapter.{i}.to_k_ip.weight"):
            raise UnknownModelError(f"IP-Adapter layer {i}: to_k_ip and to_v_ip differ in shape")
    contexts = {p[1] for p in pairs}
    if len(contexts) != 1:
        raise UnknownModelError(f"IP-Adapter layers read tokens of several widths {sorted(contexts)}")
    context_dim = contexts.pop()
    widths = [p[0] for p in pairs]

    if "image_proj.proj.weight" in sd:
        rows, image_dim = shape("image_proj.proj.weight")
        width = shape("image_proj.norm.weight")[0]
        if width != context_dim or rows % width:
            raise UnknownModelError(f"IP-Adapter image_proj makes {rows} values in tokens of {width}; its layers read "
                                    f"tokens of {context_dim}")
        return IPAdapterConfig("linear", image_dim, context_dim, rows // width, widths)
    if "image_proj.proj.3.weight" in sd:
        return IPAdapterConfig("mlp", shape("image_proj.proj.0.weight")[1], shape("image_proj.proj.3.weight")[0], 0,
                               widths)
    if "image_proj.latents" in sd:
        _, queries, dim = shape("image_proj.latents")
        depth = len({int(m.group(1)) for k in sd if (m := _RESAMPLER_LAYER.match(k))})
        dim_head = int(hints.get("resampler_dim_head", 64))
        inner = shape("image_proj.layers.0.0.to_q.weight")[0]
        if inner % dim_head:
            raise UnknownModelError(f"IP-Adapter resampler attention is {inner} wide: not a multiple of the "
                                    f"{dim_head}-wide heads of the releases")
        output = shape("image_proj.proj_out.weight")[0]
        if output != context_dim:
            raise UnknownModelError(f"IP-Adapter resampler makes tokens of {output}; its layers read {context_dim}")
        return IPAdapterConfig("resampler", shape("image_proj.proj_in.weight")[1], context_dim, queries, widths,
                               resampler_dim=dim, resampler_depth=depth, resampler_heads=inner // dim_head,
                               resampler_dim_head=dim_head,
                               resampler_ff_mult=shape("image_proj.layers.0.1.1.weight")[0] // dim)
    heads = sorted({k.split(".")[1] for k in sd if k.startswith("image_proj.")})
    raise UnknownModelError(f"IP-Adapter image_proj holds {heads}: not a projection diffstudio knows (linear "
                            "proj + norm, the Plus resampler's latents, or the full-face proj.0..3)")


def ip_adapter_config_from_dict(data: Mapping) -> IPAdapterConfig:
    return IPAdapterConfig.from_dict(dict(data))


# -- XLabs' FLUX layout (models/flux_ipadapter.py) ---------------------------------------------------------

FLUX_IP_ADAPTER_SENTINELS = ("ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.norm.weight",
                             "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight")
_FLUX_LAYER = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_k_proj\.weight$")


def is_flux_ip_adapter(keys) -> bool:
    return all(k in keys for k in FLUX_IP_ADAPTER_SENTINELS)


def derive_flux_ip_adapter_config(sd: Mapping, hints: Mapping | None = None) -> IPAdapterConfig:
    """XLabs FLUX IP-Adapter state dict -> IPAdapterConfig: the image embedding width and the token width from
    ``proj`` and ``norm``, the token count from their ratio (4 in flux-ip-adapter v1, 16 in v2), one hidden
    width per double block (numbered 0 .. depth - 1) from the key projections."""
    if not is_flux_ip_adapter(sd):
        missing = [k for k in FLUX_IP_ADAPTER_SENTINELS if k not in sd]
        raise UnknownModelError(f"not a FLUX IP-Adapter: missing {missing}")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"FLUX IP-Adapter state dict lacks '{key}' (truncated file?)")
        return tuple(sd[key].shape)

    rows, image_dim = shape("ip_adapter_proj_model.proj.weight")
    context_dim = shape("ip_adapter_proj_model.norm.weight")[0]
    if rows % context_dim:
        raise UnknownModelError(f"FLUX IP-Adapter projection makes {rows} values: not whole tokens of {context_dim}")
    blocks = sorted(int(m.group(1)) for k in sd if (m := _FLUX_LAYER.match(k)))
    if blocks != list(range(len(blocks))):
        raise UnknownModelError(f"FLUX IP-Adapter double blocks are numbered {blocks[:8]}...: expected 0, 1, 2, ...")
    widths = []
    for i in blocks:
        base = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
        k, v = shape(base + "k_proj.weight"), shape(base + "v_proj.weight")
        if k != v or k[1] != context_dim:
            raise UnknownModelError(f"FLUX IP-Adapter block {i}: key and value projections are {k} and {v}; both "
                                    f"should read {context_dim}-wide tokens")
        widths.append(k[0])
    return IPAdapterConfig("linear", image_dim, context_dim, rows // context_dim, widths)
