"""Prompt -> T5 (or mT5) encoder hidden states, for SD3, FLUX and Hunyuan-DiT.

Unlike CLIP's 77-token chunks, a T5 prompt is one sequence: tokenized with the end-of-sequence
token appended, truncated to ``max_length`` and padded to exactly ``max_length`` with the pad
token (SD3: 256, FLUX dev: 512, Hunyuan-DiT: 256), so every prompt of a batch has the same length
and the denoiser sees a fixed number of text tokens. T5 has relative positions only, so the
padding changes nothing for the prompt's tokens unless they attend to it: SD3 and FLUX run the
encoder *without* an attention mask (pad tokens are attended to, as in their releases), Hunyuan-DiT
with one. The tokenizer's mask is returned either way for denoisers that mask text tokens.

Prompts are read in the A1111 prompt language (docs/prompts.md), parsed once by the family record
(``prompt_input.parse_prompts``) or here: weights apply to T5's tokens by the rule CLIP uses
(``weighting.apply_emphasis``, over the whole sequence, or only over the mask's tokens when the
encoder runs with it); a prompt without syntax gives exactly the plain tokenizer's ids. T5 reads one
sequence, so it ignores BREAK (the parts are read as one text) and cannot use textual-inversion
embeddings (read as text): one ``PromptSyntaxWarning`` per call says which it ignored.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def tokenize_t5(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_length) long: EOS appended, truncated, padded."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def encode_t5(text_encoder: torch.nn.Module, tokenizer, prompts, *, max_length: int = 256,
              use_attention_mask: bool = False, embeddings: Mapping | None = None, emphasis: str = "original",
              syntax: bool = True, name: str = "T5") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts (strings or ``ParsedPrompt``) with a transformers ``T5EncoderModel`` (or ``MT5EncoderModel``).

    Returns ``hidden`` (B, max_length, d_model), the encoder's last hidden state (after its final
    layer norm), weighted (``emphasis``: ``weighting.EMPHASIS_MODES``), in the encoder's dtype on its
    device, and the token mask (B, max_length) bool (True = a prompt token or its EOS).
    ``use_attention_mask`` passes the mask to the encoder. ``embeddings`` (the model's textual-inversion
    embeddings) are only looked for, to name them in the warning; ``name`` is the encoder's in messages.
    """
    from diffstudio.conditioning.prompt_input import parse_prompts, warn_ignored
    from diffstudio.conditioning.sequence_tokens import (
        hf_tokenize,
        hf_word_start,
        joined_parts,
        sequence_rows,
    )
    from diffstudio.conditioning.weighting import apply_emphasis

    parsed = parse_prompts(prompts, syntax)
    if not parsed:
        raise ValueError("encode_t5 needs at least one prompt.")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    warn_ignored(name, parsed, embeddings=embeddings, sequence_length=max_length)
    rows = sequence_rows([joined_parts(p) for p in parsed], hf_tokenize(tokenizer), max_length=max_length,
                         pad=tokenizer.pad_token_id, suffix=[tokenizer.eos_token_id],
                         word_start=hf_word_start(tokenizer))
    device = next(text_encoder.parameters()).device
    ids, mask = rows.ids.to(device), rows.mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask if use_attention_mask else None)
    hidden = apply_emphasis(out.last_hidden_state, rows.weights, emphasis, mask if use_attention_mask else None)
    return hidden, mask.bool()
