"""Tokenizers, loaded offline: the packaged CLIP BPE vocabulary, or a tokenizer folder.

The packaged vocabulary (``diffstudio/data/tokenizers/clip``: vocab.json, merges.txt,
tokenizer_config.json) is OpenAI CLIP's byte-pair encoding, built from open_clip's
``bpe_simple_vocab_16e6`` (MIT licence, see NOTICE). It is the tokenizer of every CLIP text
encoder used by SD 1.x, SD 2.x, SDXL, SD3 and FLUX; only the padding token differs
(SD 1.x pads with ``<|endoftext|>``, SD 2.x's OpenCLIP tokenizer with ``!``, id 0), and the
pad id is a constructor argument here so no second copy of the vocabulary is needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import CLIPTokenizer

from diffstudio.errors import ModelNotFoundError

PACKAGED_CLIP_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "tokenizers" / "clip"

# Files that make a folder a tokenizer folder (either the BPE pair or a tokenizers' JSON file).
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def load_clip_tokenizer(path: str | Path | None = None, *, pad_token: str | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from the packaged vocabulary (``path=None``) or from a folder.

    ``path`` may be a tokenizer folder or a diffusers model folder holding ``tokenizer/``.
    ``pad_token`` overrides the folder's pad token (``"!"`` for SD 2.x's OpenCLIP convention).
    Nothing is downloaded. Results are cached per (folder, pad token): treat the returned
    tokenizer as read-only, it is shared.
    """
    folder = _resolve_folder(path)
    return _load_cached(str(folder), pad_token)


def _resolve_folder(path: str | Path | None) -> Path:
    if path is None:
        return PACKAGED_CLIP_TOKENIZER
    folder = Path(path).expanduser().resolve()
    for candidate in (folder, folder / "tokenizer"):
        if candidate.is_dir() and any(
            all((candidate / f).is_file() for f in files) for files in _TOKENIZER_FILES
        ):
            return candidate
    raise ModelNotFoundError(
        f"No CLIP tokenizer in {folder}: expected vocab.json + merges.txt (or tokenizer.json) there or "
        "in its tokenizer/ subfolder. Pass path=None to use the packaged CLIP vocabulary."
    )


@functools.lru_cache(maxsize=8)
def _load_cached(folder: str, pad_token: str | None) -> CLIPTokenizer:
    kwargs = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


# --- every tokenizer kind a family record may name (TextEncoderSpec.tokenizer_data) --------------------

PACKAGED = PACKAGED_CLIP_TOKENIZER.parent  # diffstudio/data/tokenizers (licences: NOTICE-extra.md)


def _clip(folder):
    return load_clip_tokenizer(folder)


def _clip_g(folder):  # OpenCLIP bigG (SDXL, SD3): the CLIP vocabulary, padded with "!" (id 0)
    return load_clip_tokenizer(folder, pad_token="!")


@functools.lru_cache(maxsize=8)
def _t5(folder):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder or PACKAGED / "t5"), local_files_only=True)


@functools.lru_cache(maxsize=8)
def _mt5(folder):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder or PACKAGED / "mt5"), local_files_only=True)


@functools.lru_cache(maxsize=8)
def _bert_zh(folder):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(folder or PACKAGED / "bert_zh"), local_files_only=True)


def _chatglm(folder):
    from diffstudio.conditioning.chatglm_tokenizer import load_chatglm_tokenizer

    return load_chatglm_tokenizer(folder or PACKAGED / "chatglm")


# kind -> (loader(folder or None), the files that make a model folder's tokenizer/ usable)
TOKENIZERS = {
    "clip": (_clip, ("vocab.json", "merges.txt")),
    "clip_g": (_clip_g, ("vocab.json", "merges.txt")),
    "t5": (_t5, ("tokenizer.json",)),
    "mt5": (_mt5, ("spiece.model",)),
    "bert_zh": (_bert_zh, ("vocab.txt",)),
    "chatglm": (_chatglm, ("tokenizer.model",)),
}


def load_tokenizer(kind: str, folder: str | Path | None = None):
    """The tokenizer of ``kind`` from ``folder`` when it holds that kind's files, else the packaged one."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZERS)}")
    loader, files = TOKENIZERS[kind]
    if folder is not None and all((Path(folder) / f).is_file() for f in files):
        return loader(Path(folder))
    return loader(None)
