"""Prompt -> BERT hidden states with an attention mask (Hunyuan-DiT's bilingual CLIP text tower).

One fixed-length sequence per prompt, as the release and diffusers' HunyuanDiTPipeline encode it:
``[CLS] tokens [SEP]`` truncated to ``max_length`` (77) and padded with ``[PAD]`` (id 0). The encoder
runs with the attention mask (pad positions are not attended to) and one token type (0); the mask is
returned because the denoiser replaces the padded positions with learned vectors. Chinese text is
split into single characters by the WordPiece tokenizer (``tokenize_chinese_chars``), English is
lower-cased; anything outside the 47,020-entry vocabulary becomes ``[UNK]``.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize_bert(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_length) long."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def encode_bert(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str] | str, *,
                max_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (B, max_length, width) in the encoder's dtype and the token mask (B, max_length) bool."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("encode_bert needs at least one prompt.")
    ids, mask = tokenize_bert(tokenizer, prompts, max_length)
    device = next(text_encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    return out.last_hidden_state, mask.bool()
