"""Prompts as every text encoder receives them: parsed once, and what an encoder cannot honour, said once.

A family record parses its prompts with :func:`parse_prompts` and hands the same
:class:`~diffstudio.conditioning.prompt_syntax.ParsedPrompt` objects to each of its encoders (CLIP,
T5, BERT, ChatGLM); an encoder given plain strings parses them itself, so a direct call reads the
same language. An encoder that cannot honour part of a prompt (BREAK in a one-sequence encoder, a
textual-inversion embedding in a non-CLIP encoder) calls :func:`warn_ignored`, which issues one
:class:`PromptSyntaxWarning` per call naming everything it ignored.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from diffstudio.conditioning.prompt_syntax import ParsedPrompt, parse_prompt


class PromptSyntaxWarning(UserWarning):
    """Part of a prompt that an encoder cannot honour (it still encodes the rest)."""


def parse_prompts(prompts: str | ParsedPrompt | Sequence[str | ParsedPrompt], syntax: bool = True
                  ) -> list[ParsedPrompt]:
    """Each prompt parsed (``syntax=False``: read literally); already parsed prompts pass through."""
    if isinstance(prompts, (str, ParsedPrompt)):
        prompts = [prompts]
    return [p if isinstance(p, ParsedPrompt) else parse_prompt(p) if syntax else ParsedPrompt.literal(p)
            for p in prompts]


def referenced_embeddings(prompts: Sequence[ParsedPrompt], embeddings: Mapping | None) -> list[str]:
    """The names of ``embeddings`` written in the prompts as whole words (case-insensitive), sorted."""
    if not embeddings:
        return []
    texts = ["\n".join("".join(f.text for f in chunk) for chunk in p.chunks) for p in prompts]
    return sorted(name for name in embeddings
                  if any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", t, re.IGNORECASE) for t in texts))


def warn_ignored(encoder: str, prompts: Sequence[ParsedPrompt], *, embeddings: Mapping | None = None,
                 sequence_length: int | None = None) -> None:
    """One warning naming what ``encoder`` ignores in these prompts, or none when it ignores nothing.

    ``sequence_length`` set: the encoder reads one sequence of that many tokens, so it ignores BREAK
    (the parts are read as one text). Named embeddings are always ignored (read as plain text).
    """
    notes = []
    if sequence_length is not None and any(p.has_break for p in prompts):
        notes.append(f"{encoder} ignores BREAK: it reads each prompt as one sequence of {sequence_length} tokens, "
                     "so the parts are read as one text")
    names = referenced_embeddings(prompts, embeddings)
    if names:
        listed = ", ".join(repr(n) for n in names)
        notes.append(f"{encoder} cannot use textual-inversion embeddings (they are CLIP token vectors): "
                     f"{listed} {'is' if len(names) == 1 else 'are'} read as plain text")
    if notes:
        warnings.warn("; ".join(notes), PromptSyntaxWarning, stacklevel=3)
