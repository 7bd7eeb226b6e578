"""ChatGLM3's tokenizer, as Kolors uses it: SentencePiece pieces behind a [gMASK] sop prefix,
left-padded to a fixed length.

The vocabulary is ChatGLM3-6B's SentencePiece model (``diffstudio/data/tokenizers/chatglm/
tokenizer.model``, 64,789 pieces; licence in NOTICE-extra.md). ChatGLM3 appends nine special
tokens after the pieces, in this order: ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
<|assistant|> <|observation|>`` (ids 64789..64797). Padding uses the SentencePiece ``<unk>`` id (0).

One prompt becomes ``[gMASK] sop`` + its pieces (GLM's prefix: [gMASK] asks the model to generate
from here, ``sop`` starts the piece; Du et al. 2022, sec. 2.1), truncated on the right to
``max_length`` ids in all, then padded *on the left* to ``max_length``. Alongside the ids come
``attention_mask`` (0 on padding) and ``position_ids`` (0 on padding, then 0, 1, 2 ... over the
tokens): the three inputs the Kolors pipeline hands the text encoder. Special-token text inside a
prompt ("<|user|>", "[gMASK]") is not interpreted: it is tokenized as ordinary text, as Kolors does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from diffstudio.errors import ModelNotFoundError

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
KOLORS_MAX_LENGTH = 256  # the Kolors pipeline's max_sequence_length (it refuses more)


class ChatGLMTokenizer:
    """``tokenizer(prompts, max_length=256) -> {"input_ids", "attention_mask", "position_ids"}``
    (long tensors of shape (B, max_length))."""

    def __init__(self, model_file: str | Path):
        from sentencepiece import SentencePieceProcessor

        self.model_file = str(model_file)
        self.sp = SentencePieceProcessor(model_file=self.model_file)
        n = self.sp.vocab_size()
        self.special_ids = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.pad_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()

    @property
    def prefix_ids(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def piece_ids(self, text: str) -> list[int]:
        """SentencePiece ids of ``text`` without the prefix, untruncated."""
        return list(self.sp.encode(text))

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """The prefix and the pieces of ``text``, truncated to ``max_length`` ids (no padding)."""
        ids = self.prefix_ids + self.piece_ids(text)
        if max_length is not None:
            if max_length < len(self.prefix_ids):
                raise ValueError(f"max_length {max_length} leaves no room for the [gMASK] sop prefix")
            ids = ids[:max_length]
        return ids

    def __call__(self, prompts: str | Sequence[str], max_length: int = KOLORS_MAX_LENGTH,
                 padding: str = "max_length") -> dict[str, torch.Tensor]:
        """Tokenize, truncate and left-pad. ``padding``: "max_length" (Kolors) or "longest"."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        rows = [self.encode(p, max_length) for p in prompts]
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        ids, mask, positions = [], [], []
        for row in rows:
            pad = width - len(row)
            ids.append([self.pad_token_id] * pad + row)
            mask.append([0] * pad + [1] * len(row))
            positions.append([0] * pad + list(range(len(row))))
        as_tensor = functools.partial(torch.tensor, dtype=torch.long)
        return {"input_ids": as_tensor(ids), "attention_mask": as_tensor(mask), "position_ids": as_tensor(positions)}

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; padding is skipped and special tokens are written by name."""
        names = {i: t for t, i in self.special_ids.items()}
        text, run = [], []
        for i in ids:
            i = int(i)
            if i in names:
                text.append(self.sp.decode(run))
                text.append(names[i])
                run = []
            elif i != self.pad_token_id:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)


def load_chatglm_tokenizer(path: str | Path) -> ChatGLMTokenizer:
    """A ChatGLM tokenizer from a folder holding ``tokenizer.model`` (or that file itself)."""
    path = Path(path).expanduser()
    model_file = path / "tokenizer.model" if path.is_dir() else path
    if not model_file.is_file():
        raise ModelNotFoundError(f"no ChatGLM tokenizer at {path}: expected a tokenizer.model (SentencePiece) "
                                 "there; pass no folder to use the packaged ChatGLM3 vocabulary")
    return _cached(str(model_file.resolve()))


@functools.lru_cache(maxsize=4)
def _cached(model_file: str) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(model_file)
