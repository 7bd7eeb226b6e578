"""Prompt -> BERT hidden states with an attention mask (Hunyuan-DiT's bilingual CLIP text tower).

One fixed-length sequence per prompt, as the release and diffusers' HunyuanDiTPipeline encode it:
``[CLS] tokens [SEP]`` truncated to ``max_length`` (77) and padded with ``[PAD]`` (id 0). The encoder
runs with the attention mask (pad positions are not attended to) and one token type (0); the mask is
returned because the denoiser replaces the padded positions with learned vectors. Chinese text is
split into single characters by the WordPiece tokenizer (``tokenize_chinese_chars``), English is
lower-cased; anything outside the 47,020-entry vocabulary becomes ``[UNK]``.

Prompts are read in the A1111 prompt language (docs/prompts.md), as for T5 (``t5_encode``): weights
apply by CLIP's rule, the means taken over the unmasked positions (the DiT replaces the others); BREAK
and textual-inversion embeddings are ignored with one ``PromptSyntaxWarning`` per call.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def tokenize_bert(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_length) long."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def encode_bert(text_encoder: torch.nn.Module, tokenizer, prompts, *, max_length: int = 77,
                embeddings: Mapping | None = None, emphasis: str = "original",
                syntax: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (B, max_length, width), weighted, in the encoder's dtype and the token mask
    (B, max_length) bool. ``prompts``: strings or ``ParsedPrompt``; ``embeddings`` as for ``encode_t5``."""
    from diffstudio.conditioning.prompt_input import parse_prompts, warn_ignored
    from diffstudio.conditioning.sequence_tokens import hf_tokenize, joined_parts, sequence_rows
    from diffstudio.conditioning.weighting import apply_emphasis

    parsed = parse_prompts(prompts, syntax)
    if not parsed:
        raise ValueError("encode_bert needs at least one prompt.")
    warn_ignored("BERT", parsed, embeddings=embeddings, sequence_length=max_length)
    # WordPiece has no word-start token: "##" marks continuations instead.
    rows = sequence_rows([joined_parts(p) for p in parsed], hf_tokenize(tokenizer), max_length=max_length,
                         pad=tokenizer.pad_token_id, prefix=[tokenizer.cls_token_id], suffix=[tokenizer.sep_token_id])
    device = next(text_encoder.parameters()).device
    ids, mask = rows.ids.to(device), rows.mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    return apply_emphasis(out.last_hidden_state, rows.weights, emphasis, mask), mask.bool()
