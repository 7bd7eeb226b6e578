"""Parsed prompts -> CLIP token chunks with a weight per token and textual-inversion slots.

The chunking rules are A1111's (and, for prompts without syntax, exactly those of
``clip_encode.chunk_token_ids``):

* every text fragment is tokenised on its own (no specials, no truncation); each of its tokens
  carries the fragment's weight;
* tokens fill chunks of ``chunk_len`` (75); a chunk is closed when the next token does not fit,
  at a BREAK (even an empty one: ``BREAK x`` starts with an empty chunk) and at the end (unless it
  is empty and not the first);
* an embedding's N vectors never straddle two chunks: when they do not fit in the current chunk
  it is closed first (an embedding longer than a chunk is refused);
* each chunk is ``BOS, tokens..., EOS`` padded to ``chunk_len + 2``; BOS, EOS and padding weigh 1.

An embedding of the ``embeddings`` mapping (the model's) is found by its name's token ids, longest
name first, so the match is as case-insensitive as the tokenizer (CLIP lower-cases) and respects
word boundaries the way BPE does.
Its positions hold :data:`PLACEHOLDER_ID` until ``embeddings.inject`` swaps in the vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from diffstudio.conditioning.embeddings import Embedding, EmbeddingSlot
from diffstudio.conditioning.prompt_syntax import BREAK, ParsedPrompt
from diffstudio.errors import InvalidInputError

# Token id left at an embedding's positions (its rows are replaced): not BOS/EOS, so pooling that
# looks for the first EOS, or the largest id (old configs), is not disturbed.
PLACEHOLDER_ID = 0


@dataclass
class TokenChunk:
    """One chunk: ``chunk_len + 2`` ids and weights, and the embeddings placed in it (by position)."""

    ids: list[int]
    weights: list[float]
    slots: list[tuple[int, Embedding]] = field(default_factory=list)


@dataclass
class BatchTokens:
    """A batch of prompts as encoder rows: prompt b's chunk k is row ``b * n_chunks + k``."""

    rows: list[list[int]]
    weights: list[list[float]]
    slots: list[EmbeddingSlot]
    n_chunks: int


def batch_tokens(tokenizer, prompts: Sequence[str | ParsedPrompt], *, chunk_len: int, bos: int, eos: int, pad: int,
                 syntax: bool = True, embeddings: Mapping[str, Embedding] | None = None) -> BatchTokens:
    """Every prompt's chunks, padded with empty chunks to the batch's largest chunk count.

    ``prompts``: parsed prompts, or strings parsed here (``syntax=False``: read literally)."""
    from diffstudio.conditioning.prompt_input import parse_prompts

    parsed = [list(p.fragments) for p in parse_prompts(prompts, syntax)]
    texts = [f.text for fragments in parsed for f in fragments if f is not BREAK]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []
    token_ids = iter(encoded)
    names = _name_index(tokenizer, embeddings or {})
    per_prompt = []
    for fragments in parsed:
        builder = _ChunkBuilder(chunk_len, bos, eos, pad)
        for fragment in fragments:
            if fragment is BREAK:
                builder.close()
            else:
                _add_fragment(builder, list(next(token_ids)), fragment.weight, names)
        per_prompt.append(builder.finish())

    n_chunks = max(len(chunks) for chunks in per_prompt)
    empty = _ChunkBuilder(chunk_len, bos, eos, pad).finish()[0]
    rows, weights, slots = [], [], []
    for chunks in per_prompt:
        for chunk in chunks + [empty] * (n_chunks - len(chunks)):
            slots += [EmbeddingSlot(len(rows), start, emb) for start, emb in chunk.slots]
            rows.append(chunk.ids)
            weights.append(chunk.weights)
    return BatchTokens(rows, weights, slots, n_chunks)


def _name_index(tokenizer, embeddings: Mapping[str, Embedding]) -> dict[int, list[tuple[tuple[int, ...], Embedding]]]:
    """first token id -> [(the name's token ids, embedding)], longest names first."""
    if not embeddings:
        return {}
    items = list(embeddings.items())
    ids = tokenizer([name for name, _ in items], add_special_tokens=False, truncation=False, verbose=False)
    index: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
    for (_name, embedding), name_ids in zip(items, ids["input_ids"]):
        if name_ids:
            index.setdefault(name_ids[0], []).append((tuple(name_ids), embedding))
    for candidates in index.values():
        candidates.sort(key=lambda item: -len(item[0]))
    return index


def _add_fragment(builder: _ChunkBuilder, ids: list[int], weight: float, names) -> None:
    position = 0
    while position < len(ids):
        match = next((c for c in names.get(ids[position], ()) if tuple(ids[position : position + len(c[0])]) == c[0]),
                     None)
        if match is None:
            builder.add_token(ids[position], weight)
            position += 1
        else:
            builder.add_embedding(match[1], weight)
            position += len(match[0])


class _ChunkBuilder:
    def __init__(self, chunk_len: int, bos: int, eos: int, pad: int):
        self.chunk_len, self.bos, self.eos, self.pad = chunk_len, bos, eos, pad
        self.chunks: list[TokenChunk] = []
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.slots: list[tuple[int, Embedding]] = []

    def close(self) -> None:
        fill = self.chunk_len - len(self.ids)
        self.chunks.append(TokenChunk([self.bos, *self.ids, self.eos] + [self.pad] * fill,
                                      [1.0, *self.weights, 1.0] + [1.0] * fill, self.slots))
        self._reset()

    def add_token(self, token: int, weight: float) -> None:
        if len(self.ids) == self.chunk_len:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, embedding: Embedding, weight: float) -> None:
        n = embedding.num_vectors
        if n > self.chunk_len:
            raise InvalidInputError(f"the embedding {embedding.name!r} has {n} vectors, more than the {self.chunk_len} "
                                    "tokens of a chunk")
        if len(self.ids) + n > self.chunk_len:
            self.close()
        self.slots.append((1 + len(self.ids), embedding))  # +1: BOS comes first
        self.ids += [PLACEHOLDER_ID] * n
        self.weights += [weight] * n

    def finish(self) -> list[TokenChunk]:
        if self.ids or not self.chunks:
            self.close()
        return self.chunks
