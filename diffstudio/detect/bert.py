"""BERT text encoder (Hunyuan-DiT's bilingual CLIP text tower): a ``transformers.BertConfig`` from shapes.

Hunyuan-DiT's "CLIP" text encoder is the text tower of Chinese-CLIP, a BERT (chinese-roberta-wwm-ext-large:
24 layers, width 1024, 16 heads, a 47020-token WordPiece vocabulary); the released folder
``t2i/clip_text_encoder`` and diffusers' ``text_encoder`` hold a transformers ``BertModel``.

Canonical layout: transformers' ``BertModel`` names without a ``bert.`` prefix and without the pooler
(``diffstudio.convert.bert.canonical_bert_keys`` produces it)::

    embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
    encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
    encoder.layer.N.attention.output.{dense,LayerNorm}.*, encoder.layer.N.{intermediate,output}.dense.*
    encoder.layer.N.output.LayerNorm.*

What shapes reveal: vocab_size, hidden_size (word embeddings), max_position_embeddings, type_vocab_size,
intermediate_size (``encoder.layer.0.intermediate.dense.weight``), num_hidden_layers (by counting).
What they cannot: the head count (BERT convention: heads of width 64; hint ``num_attention_heads``), the
activation ("gelu"), the norm epsilon (1e-12), the pad id (0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from transformers import BertConfig

from diffstudio.errors import UnknownModelError

BERT_SENTINELS: tuple[str, ...] = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
)
# The same under the ``bert.`` level that masked-LM checkpoints and ComfyUI's files put in front.
BERT_PREFIXED_SENTINELS: tuple[str, ...] = tuple("bert." + k for k in BERT_SENTINELS)

BERT_HEAD_WIDTH = 64
HINTABLE = frozenset({"num_attention_heads", "hidden_act", "layer_norm_eps", "pad_token_id"})
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def derive_bert_config(sd: Mapping, hints: Mapping | None = None) -> BertConfig:
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_bert_config: hints {sorted(unknown)} are not allowed; allowed: {sorted(HINTABLE)}")
    missing = [k for k in BERT_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a canonical BERT state dict: missing {missing}; normalise it with "
                                "diffstudio.convert.bert.canonical_bert_keys")
    vocab, hidden = (int(d) for d in sd["embeddings.word_embeddings.weight"].shape)
    layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    if layers != set(range(len(layers))):
        raise UnknownModelError(f"BERT layers are not contiguous: found {sorted(layers)}")
    heads = hints.get("num_attention_heads")
    if heads is None:
        if hidden % BERT_HEAD_WIDTH:
            raise UnknownModelError(f"BERT width {hidden} is not a multiple of the conventional head width "
                                    f"{BERT_HEAD_WIDTH}; pass hints={{'num_attention_heads': N}}")
        heads = hidden // BERT_HEAD_WIDTH
    token_types = sd.get("embeddings.token_type_embeddings.weight")
    return BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=int(heads),
        intermediate_size=int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(sd["embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(token_types.shape[0]) if token_types is not None else 2,
        hidden_act=hints.get("hidden_act", "gelu"), layer_norm_eps=hints.get("layer_norm_eps", 1e-12),
        pad_token_id=hints.get("pad_token_id", 0))


def bert_config_from_json(config_json: Mapping) -> BertConfig:
    """A ``BertConfig`` from a config.json dict (HF folder) or our stored metadata."""
    data = {k: v for k, v in config_json.items() if not k.startswith("_") and k != "architectures"}
    return BertConfig(**data)
