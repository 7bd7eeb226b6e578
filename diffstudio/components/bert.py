"""BERT text encoder (Hunyuan-DiT's bilingual CLIP text tower), a transformers BertModel. One layout,
with or without the ``bert.`` level; normalised always."""

from __future__ import annotations

from diffstudio.components.base import ComponentArch, config_to_dict, unchanged
from diffstudio.convert.bert import build_bert, canonical_bert_keys
from diffstudio.detect.bert import BERT_PREFIXED_SENTINELS, BERT_SENTINELS, bert_config_from_json, derive_bert_config

ARCH = ComponentArch(
    name="bert",
    sentinels=BERT_SENTINELS,
    diffusers_sentinels=BERT_PREFIXED_SENTINELS,
    derive_config=derive_bert_config,
    config_from_diffusers=bert_config_from_json,
    build=build_bert,
    from_diffusers=canonical_bert_keys,
    to_diffusers=unchanged,
    config_to_dict=config_to_dict,
    config_from_dict=bert_config_from_json,
    normalise_always=True,
)
