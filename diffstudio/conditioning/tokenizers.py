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
