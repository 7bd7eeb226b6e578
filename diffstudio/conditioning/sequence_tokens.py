"""Parsed prompts -> fixed-length token rows with a weight per token, for the encoders that read one
sequence per prompt (T5 and mT5, Hunyuan-DiT's BERT, Kolors' ChatGLM).

A row is ``prefix + tokens + suffix`` truncated to ``max_length`` (the tokens are cut, the specials
kept) and padded to ``max_length``, on the right or (ChatGLM) the left. The specials are each
tokenizer's own: T5 appends EOS, BERT wraps in [CLS] ... [SEP], ChatGLM prefixes [gMASK] sop; so a
prompt without syntax gives exactly the ids of the tokenizer's own padded call.

Tokens and weights (the rule of ``prompt_tokens`` for CLIP, adapted to SentencePiece):

* a part that is one run of text (every prompt without syntax, and ``(whole prompt:1.3)``) is
  tokenised whole, exactly as plain text, each token at the run's weight;
* otherwise each run is tokenised on its own, so each token knows its weight. Its surrounding
  whitespace is removed first (SentencePiece marks a word start with "▁", which stands for it;
  ChatGLM's model would otherwise turn a leading space into an extra "▁▁" piece), and when a run
  continues the text before it without whitespace (``(a cat), a dog``, Chinese text) the "▁" that
  SentencePiece puts at the start of every text it is given comes off its first piece (a bare "▁"
  is dropped, ChatGLM's "▁," becomes ","). A word split by brackets is still tokenised in pieces,
  as on CLIP.
* specials and padding weigh 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffstudio.conditioning.prompt_syntax import Fragment, ParsedPrompt

# texts -> each text's token ids, without specials and untruncated
Tokenize = Callable[[list[str]], list[list[int]]]


@dataclass
class SequenceRows:
    """``ids``, ``mask`` (1 on prefix, tokens and suffix, 0 on padding) and ``weights``, each (rows, max_length)."""

    ids: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor


def hf_tokenize(tokenizer) -> Tokenize:
    """A transformers tokenizer as a :data:`Tokenize`."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [list(ids) for ids in encoded]

    return tokenize


@dataclass(frozen=True)
class WordStart:
    """A SentencePiece vocabulary's word-start mark "▁", to take off the first piece of a run that
    continues a word: ``piece`` (id -> piece) and ``piece_id`` (piece -> id, None when not a piece)."""

    piece: Callable[[int], str]
    piece_id: Callable[[str], int | None]

    def strip(self, first: int) -> list[int]:
        piece = self.piece(first)
        if piece == "▁":
            return []
        rest = self.piece_id(piece[1:]) if piece.startswith("▁") else None
        return [first] if rest is None else [rest]


def hf_word_start(tokenizer) -> WordStart:
    """The :class:`WordStart` of a transformers SentencePiece tokenizer (T5, mT5)."""
    def piece_id(piece: str) -> int | None:
        token_id = tokenizer.convert_tokens_to_ids(piece)
        return None if token_id is None or token_id == tokenizer.unk_token_id else token_id

    return WordStart(tokenizer.convert_ids_to_tokens, piece_id)


def joined_parts(prompt: ParsedPrompt) -> list[Fragment]:
    """The prompt's runs with its BREAKs read as spaces (for encoders that read one sequence), adjacent
    runs of one weight merged: ``a BREAK b`` becomes the one run ``a b``."""
    runs: list[Fragment] = []
    for i, part in enumerate(prompt.chunks):
        for fragment in ([Fragment(" ", 1.0)] if i else []) + part:
            if runs and runs[-1].weight == fragment.weight:
                runs[-1] = Fragment(runs[-1].text + fragment.text, fragment.weight)
            else:
                runs.append(fragment)
    return runs


def part_tokens(runs: Sequence[Fragment], tokenize: Tokenize,
                word_start: WordStart | None) -> tuple[list[int], list[float]]:
    """One part's runs -> (token ids, a weight per token), without specials (rules in the module docstring)."""
    if len(runs) <= 1:
        text, weight = (runs[0].text, runs[0].weight) if runs else ("", 1.0)
        ids = tokenize([text])[0]
        return ids, [weight] * len(ids)
    stripped = [run.text.strip() for run in runs]
    encoded = iter(tokenize([text for text in stripped if text]))
    ids: list[int] = []
    weights: list[float] = []
    before = ""  # the raw text of the runs so far
    for run, text in zip(runs, stripped):
        if text:
            tokens = next(encoded)
            continues = before and not before[-1].isspace() and not run.text[0].isspace()
            if continues and word_start is not None and tokens:
                tokens = word_start.strip(tokens[0]) + tokens[1:]
            ids += tokens
            weights += [run.weight] * len(tokens)
        before += run.text
    return ids, weights


def sequence_rows(parts: Sequence[Sequence[Fragment]], tokenize: Tokenize, *, max_length: int, pad: int,
                  prefix: Sequence[int] = (), suffix: Sequence[int] = (), word_start: WordStart | None = None,
                  pad_left: bool = False) -> SequenceRows:
    """One row per part: ``prefix + tokens + suffix``, the tokens cut to fit ``max_length``, padded to it."""
    room = max_length - len(prefix) - len(suffix)
    if room < 0:
        raise ValueError(f"max_length {max_length} leaves no room for the {len(prefix) + len(suffix)} special tokens")
    rows, masks, weights = [], [], []
    for runs in parts:
        ids, w = part_tokens(runs, tokenize, word_start)
        row = [*prefix, *ids[:room], *suffix]
        row_weights = [1.0] * len(prefix) + w[:room] + [1.0] * len(suffix)
        fill = max_length - len(row)
        if pad_left:
            rows.append([pad] * fill + row)
            masks.append([0] * fill + [1] * len(row))
            weights.append([1.0] * fill + row_weights)
        else:
            rows.append(row + [pad] * fill)
            masks.append([1] * len(row) + [0] * fill)
            weights.append(row_weights + [1.0] * fill)
    return SequenceRows(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long),
                        torch.tensor(weights, dtype=torch.float32))
