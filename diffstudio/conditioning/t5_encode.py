"""Prompt -> T5 (or mT5) encoder hidden states, for SD3, FLUX and Hunyuan-DiT.

Unlike CLIP's 77-token chunks, a T5 prompt is one sequence: tokenized with the end-of-sequence
token appended, truncated to ``max_length`` and padded to exactly ``max_length`` with the pad
token (SD3: 256, FLUX dev: 512, Hunyuan-DiT: 256), so every prompt of a batch has the same length
and the denoiser sees a fixed number of text tokens. T5 has relative positions only, so the
padding changes nothing for the prompt's tokens unless they attend to it: SD3 and FLUX run the
encoder *without* an attention mask (pad tokens are attended to, as in their releases), Hunyuan-DiT
with one. The tokenizer's mask is returned either way for denoisers that mask text tokens.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize_t5(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_length) long: EOS appended, truncated, padded."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def encode_t5(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str] | str, *, max_length: int = 256,
              use_attention_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with a transformers ``T5EncoderModel`` (or ``MT5EncoderModel``).

    Returns ``hidden`` (B, max_length, d_model), the encoder's last hidden state (after its final
    layer norm), in the encoder's dtype on its device, and the token mask (B, max_length) bool
    (True = a prompt token or its EOS). ``use_attention_mask`` passes the mask to the encoder.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("encode_t5 needs at least one prompt.")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids, mask = tokenize_t5(tokenizer, prompts, max_length)
    device = next(text_encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask if use_attention_mask else None)
    return out.last_hidden_state, mask.bool()
