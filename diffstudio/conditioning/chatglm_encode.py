"""Prompt -> ChatGLM3 hidden states and pooled vector (Kolors' text encoder).

Each prompt part is ``[gMASK] sop`` + its SentencePiece ids, cut to ``max_length`` (256) ids in all
and padded on the *left* (chatglm_tokenizer.py), with position ids 0, 1, 2 ... over the tokens and 0
on the padding, and the attention mask; the context is ``hidden_states[-clip_skip]`` (Kolors: 2, the
penultimate block), the pooled vector the last block's output at the last position (the prompt's
final token, thanks to the left padding).

Prompts are read in the A1111 prompt language (docs/prompts.md), parsed once by the family record or
here. Weights apply to the context by CLIP's rule (``weighting.apply_emphasis``, over each part's
``max_length`` positions, all of which the UNet reads); the pooled vector is never weighted. BREAK
works as on CLIP: Kolors' UNet cross-attends to a context of any length, so each BREAK part is
encoded as its own ``max_length``-token sequence and the parts are laid side by side (n parts give
``n * max_length`` tokens; prompts of a batch with fewer parts get the empty prompt's encoding, and
the pooled vector is the first part's). Textual-inversion embeddings are CLIP token vectors: their
names are read as text, with one ``PromptSyntaxWarning`` per call.

Gradients are not disabled here: wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffstudio.conditioning.chatglm_tokenizer import KOLORS_MAX_LENGTH


def encode_chatglm(encoder, tokenizer, prompts, *, clip_skip: int = 2, max_length: int = KOLORS_MAX_LENGTH,
                   embeddings: Mapping | None = None, emphasis: str = "original",
                   syntax: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (strings or ``ParsedPrompt``) -> (context (B, max_length * n_parts, hidden), pooled (B, hidden)).

    ``clip_skip`` counts from the end like CLIP's: 1 is the last block's output, 2 (Kolors) the one
    before it. The pooled vector does not depend on it.
    """
    from diffstudio.conditioning.prompt_input import parse_prompts, warn_ignored
    from diffstudio.conditioning.sequence_tokens import sequence_rows
    from diffstudio.conditioning.weighting import apply_emphasis

    parsed = parse_prompts(prompts, syntax)
    if not parsed:
        raise ValueError("encode_chatglm needs at least one prompt.")
    warn_ignored("ChatGLM", parsed, embeddings=embeddings)
    n_parts = max(len(p.chunks) for p in parsed)
    parts = [part for p in parsed for part in p.chunks + [[]] * (n_parts - len(p.chunks))]  # row b * n_parts + k
    rows = sequence_rows(parts, lambda texts: [tokenizer.piece_ids(t) for t in texts], max_length=max_length,
                         pad=tokenizer.pad_token_id, prefix=tokenizer.prefix_ids,
                         word_start=_word_start(tokenizer), pad_left=True)
    positions = (rows.mask.cumsum(dim=1) - 1).clamp(min=0)  # 0 on the padding, then 0, 1, 2 ...
    device = next(encoder.parameters()).device
    out = encoder(rows.ids.to(device), rows.mask.to(device), positions.to(device))
    states = out.hidden_states                                     # embeddings + one per block
    if not 1 <= clip_skip < len(states):
        raise ValueError(f"clip_skip must be in 1..{len(states) - 1} for this ChatGLM, got {clip_skip}")
    context = apply_emphasis(states[-clip_skip], rows.weights, emphasis)
    batch, width = len(parsed), context.shape[-1]
    pooled = states[-1][:, -1].reshape(batch, n_parts, -1)[:, 0]  # left padding: the last column is a token
    return context.reshape(batch, n_parts * max_length, width), pooled


def _word_start(tokenizer):
    from diffstudio.conditioning.sequence_tokens import WordStart

    sp = tokenizer.sp

    def piece_id(piece: str) -> int | None:
        token_id = sp.piece_to_id(piece)
        return None if token_id == sp.unk_id() else token_id

    return WordStart(sp.id_to_piece, piece_id)
