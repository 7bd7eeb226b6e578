"""T5 encoder state dicts: known layouts -> the canonical layout, and the module they load into.

Layouts read by ``canonical_t5_keys`` (see diffstudio.detect.t5 for the canonical names):
  * transformers' ``T5EncoderModel.state_dict()`` (``shared.weight`` and ``encoder.embed_tokens.weight``,
    one tensor under two names): the second name is dropped;
  * files holding only ``encoder.embed_tokens.weight``: renamed to ``shared.weight``;
  * a whole ``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration``: the decoder and the
    LM head are dropped (only the encoder conditions a diffusion model).

``build_t5_encoder`` returns a transformers ``T5EncoderModel`` whose ``state_dict()`` is the
canonical layout and whose ``load_state_dict`` accepts it (the embedding tie is restored after an
``assign=True`` load, which would otherwise leave the second name on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import T5Config, T5EncoderModel

from diffstudio.errors import ConversionError

SHARED, EMBED = "shared.weight", "encoder.embed_tokens.weight"
_DROPPED_PREFIXES = ("decoder.", "lm_head.")


def canonical_t5_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout above -> canonical keys. Tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        if key.startswith(_DROPPED_PREFIXES) or key == EMBED:
            continue
        if key == SHARED or key.startswith("encoder."):
            out[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) are not part of a T5 encoder: {unknown[:8]}. Pass only the "
                              "encoder's weights (strip the checkpoint's component prefix).")
    if SHARED not in out:
        if EMBED not in sd:
            raise ConversionError("T5 state dict without an embedding (shared.weight / encoder.embed_tokens.weight)")
        out[SHARED] = sd[EMBED]
    return out


def build_t5_encoder(config: T5Config) -> T5EncoderModel:
    """A randomly initialised ``T5EncoderModel`` (on the ambient device; ``meta`` allocates nothing)."""
    model = T5EncoderModel(config)
    model.register_state_dict_post_hook(_drop_tied_name)
    model.register_load_state_dict_post_hook(_after_load)
    return model


def _drop_tied_name(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + EMBED, None)  # the same tensor as shared.weight


def _after_load(module: T5EncoderModel, incompatible) -> None:
    """Re-tie the embedding after a load, and keep the feed-forward outputs in float32 for fp16.

    With ``assign=True`` a load replaces ``shared.weight`` but leaves the second name pointing at
    the old tensor; both names must be the same tensor again. T5 was trained in bfloat16 and its
    feed-forward output projections (``wo``) overflow in float16, so they stay in float32 there
    (transformers does the same with ``_keep_in_fp32_modules``; T5's forward casts to wo's dtype).
    """
    missing = incompatible.missing_keys
    if SHARED in missing and EMBED not in missing:
        module.shared.weight = module.encoder.embed_tokens.weight
    module.encoder.embed_tokens.weight = module.shared.weight
    for key in (SHARED, EMBED):
        if key in missing and module.shared.weight.device.type != "meta":
            missing.remove(key)
    for block in module.encoder.block:
        wo = block.layer[-1].DenseReluDense.wo
        if wo.weight.dtype == torch.float16:
            wo.float()
