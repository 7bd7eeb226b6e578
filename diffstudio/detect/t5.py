"""T5 encoder (T5 v1.0/v1.1, mT5): derive a ``transformers.T5Config`` from key names and shapes.

Reference: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5), section 2.1: pre-LN Transformer with RMS layer norms (scale only, no bias), no
absolute positions but a learned relative-position bias shared by all layers (stored in block 0,
one scalar per bucket and head), and no attention scaling. T5 v1.1 and mT5 use a gated-GELU
feed-forward (``wi_0`` gate, ``wi_1`` linear, Shazeer 2020); T5 v1.0 a ReLU one (``wi``).

Canonical layout = transformers' ``T5EncoderModel`` names, with the embedding as ``shared.weight``
only (``encoder.embed_tokens.weight`` is the same tensor and is dropped)::

    shared.weight                                             (V, d_model)
    encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight      (heads * d_kv, d_model)
    encoder.block.N.layer.0.SelfAttention.o.weight            (d_model, heads * d_kv)
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (buckets, heads)
    encoder.block.N.layer.0.layer_norm.weight                 (d_model,)
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight  (gated)  or  .{wi,wo}.weight
    encoder.block.N.layer.1.layer_norm.weight
    encoder.final_layer_norm.weight

Every hyper-parameter except these is in the shapes; hints may supply them:
    relative_attention_max_distance   128 (every T5 / mT5 release)
    layer_norm_epsilon                1e-6
    feed_forward_proj                 "gated-gelu" when wi_0 exists, else "relu"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import T5Config

from diffstudio.detect.vae import count_indices
from diffstudio.errors import UnknownModelError

T5_SENTINELS = (
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.final_layer_norm.weight",
)

EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # canonical first
HINTABLE = frozenset({"relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj"})

_ATTN = "encoder.block.0.layer.0.SelfAttention"
_FF = "encoder.block.0.layer.1.DenseReluDense"


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in sd[key].shape)


def derive_t5_config(sd: Mapping[str, Any], hints: Mapping[str, Any] | None = None) -> T5Config:
    """A T5Config for an encoder-only T5 from a state dict in the canonical layout (names + shapes)."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_t5_config: hints {sorted(unknown)} are not allowed; shapes decide those "
                         f"(allowed: {sorted(HINTABLE)})")
    missing = [k for k in T5_SENTINELS if k not in sd]
    embedding = next((k for k in EMBEDDING_KEYS if k in sd), None)
    if missing or embedding is None:
        raise UnknownModelError(f"not a T5 encoder state dict: missing {missing or list(EMBEDDING_KEYS)}. "
                                "Strip the component prefix (e.g. 'text_encoders.t5xxl.transformer.') first.")
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd:
        raise UnknownModelError("this T5 has a relative-position bias in every layer (UMT5); diffstudio's "
                                "t5_encoder supports T5 and mT5, whose bias lives in block 0 only")
    vocab, d_model = _shape(sd, embedding)
    inner, _ = _shape(sd, f"{_ATTN}.q.weight")
    buckets, heads = _shape(sd, f"{_ATTN}.relative_attention_bias.weight")
    if inner % heads:
        raise UnknownModelError(f"T5 attention width {inner} does not split into {heads} heads")
    if f"{_FF}.wi_0.weight" in sd:
        d_ff = _shape(sd, f"{_FF}.wi_0.weight")[0]
        ff_proj = hints.get("feed_forward_proj", "gated-gelu")
    elif f"{_FF}.wi.weight" in sd:
        d_ff = _shape(sd, f"{_FF}.wi.weight")[0]
        ff_proj = hints.get("feed_forward_proj", "relu")
    else:
        raise UnknownModelError(f"T5 block 0 has no feed-forward weights ({_FF}.wi_0 / .wi)")
    if ff_proj.startswith("gated-") != (f"{_FF}.wi_0.weight" in sd):
        raise UnknownModelError(f"feed_forward_proj {ff_proj!r} does not match the weights "
                                f"({'gated wi_0/wi_1' if f'{_FF}.wi_0.weight' in sd else 'a single wi'})")
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=count_indices(list(sd), "encoder.block"),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=int(hints.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hints.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=ff_proj,
        is_encoder_decoder=False,
        use_cache=False,
    )


def t5_config_from_json(config_json: Mapping[str, Any]) -> T5Config:
    """A T5Config from an HF config.json dict (T5 / mT5 / a T5EncoderModel) or our stored metadata."""
    data = {k: v for k, v in config_json.items() if not k.startswith("_")}
    data.pop("architectures", None)
    return T5Config(**data)
