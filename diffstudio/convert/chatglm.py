"""ChatGLM state dicts: every layout -> the released names (pure renames, no tensor copies).

Two layouts exist, with the same module names:

* the released checkpoint (Kwai-Kolors/Kolors ``text_encoder/pytorch_model-0000X-of-00007.bin``,
  THUDM/chatglm3-6b-base): keys under ``transformer.``, as written by ChatGLMForConditionalGeneration;
* a bare ``ChatGLMModel``'s own state dict (what diffusers' / transformers' ``save_pretrained`` of the
  Kolors text encoder writes): the same keys without ``transformer.``.

Both carry two tensors diffstudio does not use and drops here: ``rotary_pos_emb.inv_freq`` (a buffer,
recomputed from the config) and ``output_layer.weight`` (the language-model head; Kolors reads hidden
states only, and dropping it saves 0.5 GB in fp16). Every other key must belong to a known module,
else ``ConversionError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.convert.check import check_conversion

PREFIX = "transformer."
DROPPED = ("rotary_pos_emb.inv_freq", "output_layer.weight")
_KNOWN = re.compile(
    r"^(embedding\.word_embeddings\.weight"
    r"|encoder\.final_layernorm\.weight"
    r"|encoder\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
    r"|encoder\.layers\.\d+\.self_attention\.(query_key_value\.(weight|bias)|dense\.weight)"
    r"|encoder\.layers\.\d+\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight)$")


def canonical_chatglm_keys(sd: Mapping) -> dict:
    """Released or bare-ChatGLMModel layout -> released names, without the unused head and buffer."""
    out, consumed = {}, []
    for key, value in sd.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in DROPPED:
            consumed.append(key)
        elif _KNOWN.match(name):
            out[PREFIX + name] = value
            consumed.append(key)
    check_conversion("ChatGLM -> released layout", sd.keys(), consumed, out)
    return out


def chatglm_to_released(sd: Mapping, config=None) -> dict:
    """Canonical -> the layout of a Kolors ``text_encoder/`` folder: the same names (no head, no buffer;
    diffusers' ChatGLMModel loads them and initialises its unused head)."""
    return canonical_chatglm_keys(sd)
