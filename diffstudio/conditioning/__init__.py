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
from diffstudio.conditioning.embeddings import load_embedding, load_embeddings
from diffstudio.conditioning.prompt_input import PromptSyntaxWarning, parse_prompts
from diffstudio.conditioning.prompt_syntax import ParsedPrompt, parse_prompt
from diffstudio.conditioning.tokenizers import PACKAGED_CLIP_TOKENIZER, load_clip_tokenizer

__all__ = [
    "CHUNK_LEN",
    "PACKAGED_CLIP_TOKENIZER",
    "ParsedPrompt",
    "PromptSyntaxWarning",
    "chunk_token_ids",
    "encode_clip",
    "load_clip_tokenizer",
    "load_embedding",
    "load_embeddings",
    "parse_prompt",
    "parse_prompts",
    "prompt_token_ids",
    "special_ids",
    "tokenize_chunks",
]
