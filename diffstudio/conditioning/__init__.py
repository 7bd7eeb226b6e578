"""Prompt conditioning: tokenizers, the A1111 prompt language, embeddings, text encoding.

See docs/prompts.md for the conventions (A1111-compatible chunking, clip skip semantics).
"""

from __future__ import annotations

from diffstudio.conditioning.clip_encode import (
    CHUNK_LEN,
    chunk_token_ids,
    encode_clip,
    prompt_token_ids,
    special_ids,
    tokenize_chunks,
)
from diffstudio.conditioning.embeddings import add_embedding, load_embedding
from diffstudio.conditioning.prompt_syntax import parse_prompt
from diffstudio.conditioning.tokenizers import PACKAGED_CLIP_TOKENIZER, load_clip_tokenizer

__all__ = [
    "CHUNK_LEN",
    "PACKAGED_CLIP_TOKENIZER",
    "add_embedding",
    "chunk_token_ids",
    "encode_clip",
    "load_clip_tokenizer",
    "load_embedding",
    "parse_prompt",
    "prompt_token_ids",
    "special_ids",
    "tokenize_chunks",
]
