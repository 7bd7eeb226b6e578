"""ChatGLM text encoder (Kolors): derive a ``ChatGLMConfig`` from key names and tensor shapes.

Input: a canonical state dict (the released names, ``transformer.encoder.layers.N...``;
``diffstudio.convert.chatglm.canonical_chatglm_keys`` produces it from the other layouts). Only
names and shapes are read, so meta tensors work.

What shapes reveal:
    vocab_size, hidden_size    ``transformer.embedding.word_embeddings.weight``       (V, H)
    num_layers                 count of ``transformer.encoder.layers.N``
    projection (heads x d)     columns of ``self_attention.dense.weight``              (H, heads*d)
    key/value width (groups x d)  (rows of ``query_key_value.weight`` - heads*d) / 2
    ffn_hidden_size            rows of ``mlp.dense_h_to_4h.weight`` / 2 (SwiGLU's two halves)
    qkv_bias                   whether ``query_key_value.bias`` exists

What shapes cannot reveal: how those widths split into heads. ChatGLM2/3 and GLM-4 all use
128-wide heads (``kv_channels``), which gives ChatGLM3-6B's 32 query heads and 2 key/value groups
from 4096 and 512; a ``kv_channels`` hint (or a stored config) overrides it. RMSNorm eps 1e-5 and
the rotary base 10000 are the release's values (hints ``layernorm_eps`` / ``rope_base``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import ConversionError, UnknownModelError
from diffstudio.models.chatglm import ChatGLMConfig

CHATGLM_SENTINELS = (
    "transformer.embedding.word_embeddings.weight",
    "transformer.encoder.layers.0.self_attention.query_key_value.weight",
    "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
    "transformer.encoder.final_layernorm.weight",
)
# The layout of a ChatGLMModel's own state dict (what diffusers / transformers save): no `transformer.`.
CHATGLM_DIFFUSERS_SENTINELS = tuple(k[len("transformer."):] for k in CHATGLM_SENTINELS)

CHATGLM_HEAD_WIDTH = 128
HINTABLE = frozenset({"kv_channels", "layernorm_eps", "rope_base"})
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.")


def derive_chatglm_config(sd: Mapping, hints: Mapping | None = None) -> ChatGLMConfig:
    """Canonical ChatGLM state dict (names + shapes) -> ChatGLMConfig. See the module docstring."""
    hints = dict(hints or {})
    unknown = set(hints) - HINTABLE
    if unknown:
        raise ValueError(f"derive_chatglm_config: hints {sorted(unknown)} are not allowed; shapes decide those. "
                         f"Allowed: {sorted(HINTABLE)}")
    missing = [k for k in CHATGLM_SENTINELS if k not in sd]
    if missing:
        raise UnknownModelError(f"not a ChatGLM state dict in the released layout: missing {missing}. Normalise it "
                                "with diffstudio.convert.chatglm.canonical_chatglm_keys first.")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise UnknownModelError(f"ChatGLM state dict lacks '{key}' (truncated file?)")
        return tuple(int(d) for d in sd[key].shape)

    indices = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    if indices != set(range(len(indices))):
        raise UnknownModelError(f"ChatGLM layers are not consecutive: {sorted(indices)} (truncated file?)")
    vocab, hidden = shape("transformer.embedding.word_embeddings.weight")
    layer = "transformer.encoder.layers.0."
    qkv_rows = shape(layer + "self_attention.query_key_value.weight")[0]
    projection = shape(layer + "self_attention.dense.weight")[1]
    ffn = shape(layer + "mlp.dense_h_to_4h.weight")[0] // 2
    kv_width2 = qkv_rows - projection
    d = int(hints.get("kv_channels", CHATGLM_HEAD_WIDTH))
    if kv_width2 <= 0 or kv_width2 % 2 or projection % d or (kv_width2 // 2) % d:
        raise UnknownModelError(
            f"ChatGLM attention widths (queries {projection}, keys+values {kv_width2}) do not split into heads "
            f"of {d}: pass hints={{'kv_channels': N}} (the config.json's kv_channels) or load with its config.")
    return ChatGLMConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=len(indices), num_heads=projection // d,
        kv_channels=d, kv_groups=kv_width2 // 2 // d, ffn_hidden_size=ffn,
        layernorm_eps=float(hints.get("layernorm_eps", 1e-5)),
        qkv_bias=layer + "self_attention.query_key_value.bias" in sd,
        rope_base=float(hints.get("rope_base", 10000.0)),
    )


# Options of the release's config.json that our module implements only at one value.
_FIXED = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
          "apply_residual_connection_post_layernorm": False, "fp32_residual_connection": False,
          "pre_seq_len": None, "quantization_bit": 0}


def config_from_json(config_json: Mapping) -> ChatGLMConfig:
    """The released ``text_encoder/config.json`` (ChatGLMConfig fields) -> our ChatGLMConfig."""
    cfg = dict(config_json)
    for key, only in _FIXED.items():
        unset = only in (None, 0, False) and not cfg.get(key)
        if key in cfg and cfg[key] != only and not unset:
            raise ConversionError(f"ChatGLM config has {key}={cfg[key]!r}; diffstudio's ChatGLM supports only "
                                  f"{only!r} (the ChatGLM3-6B / Kolors value)")
    heads = int(cfg.get("num_attention_heads", 32))
    hidden = int(cfg.get("hidden_size", 4096))
    kv_channels = cfg.get("kv_channels") or hidden // heads
    groups = int(cfg.get("multi_query_group_num", 1)) if cfg.get("multi_query_attention", False) else heads
    return ChatGLMConfig(
        vocab_size=int(cfg.get("padded_vocab_size", cfg.get("vocab_size", 65024))), hidden_size=hidden,
        num_layers=int(cfg.get("num_layers", 28)), num_heads=heads, kv_channels=int(kv_channels), kv_groups=groups,
        ffn_hidden_size=int(cfg.get("ffn_hidden_size", 13696)),
        layernorm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        qkv_bias=bool(cfg.get("add_qkv_bias", False) or cfg.get("add_bias_linear", False)),
        # rope_ratio (long-context ChatGLM3 variants) scales the rotary base in THUDM's code; Kolors has none.
        rope_base=10000.0 * float(cfg.get("rope_ratio", 1.0)),
    )

