"""BERT text encoder state dicts -> the canonical layout (see diffstudio/detect/bert.py), and building.

Normalisation, applied to every layout: a ``bert.`` level in front (masked-LM checkpoints, ComfyUI) is
removed; pre-2019 ``LayerNorm.gamma`` / ``.beta`` become ``.weight`` / ``.bias``; non-weights
(``position_ids``, ``token_type_ids``) and the parts no diffusion model uses (the pooler, masked-LM and
next-sentence heads ``cls.*``) are dropped. Hunyuan-DiT reads the last hidden states only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import BertConfig, BertModel

from diffstudio.errors import ConversionError

_DROPPED_PREFIXES = ("pooler.", "cls.")
_DROPPED_SUFFIXES = ("position_ids", "token_type_ids")


def canonical_bert_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
            continue
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        if not name.startswith(("embeddings.", "encoder.")):
            unknown.append(key)
            continue
        out[name] = tensor
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) are not part of a BERT encoder: {', '.join(unknown[:6])}; "
                              "pass only the text encoder's weights")
    return out


def build_bert(config: BertConfig) -> BertModel:
    """A transformers BertModel without the pooler (built on the ambient device, ``meta`` included).

    The zero ``token_type_ids`` buffer is removed: it is not in checkpoints, and BertEmbeddings then makes
    zeros on the input's device itself (every prompt is a single segment).
    """
    model = BertModel(config, add_pooling_layer=False)
    del model.embeddings.token_type_ids
    return model
