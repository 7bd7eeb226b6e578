"""Fetching models from the Hugging Face Hub: a thin wrapper over ``huggingface_hub``.

Files land in the normal Hugging Face cache (``HF_HOME`` / ``cache_dir``), so other tools share
them. Every failure (offline, no network, unknown repo or file, gated repo) becomes a
:class:`ModelNotFoundError` that says how to put the file in place by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from diffstudio.errors import ModelNotFoundError

# A whole repository is fetched without pickled weights (.bin/.ckpt) and without code.
SNAPSHOT_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model"]  # .model: sentencepiece tokenizers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _reason(err: Exception) -> str:
    if isinstance(err, GatedRepoError):
        return "the repository is gated: accept its licence on the Hub and log in (`hf auth login`)"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repository (or it is private: log in with `hf auth login`)"
    if isinstance(err, RevisionNotFoundError):
        return "no such revision (branch, tag or commit) in the repository"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _offline():
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        return f"{why} and the file is not in the local cache"
    if isinstance(err, EntryNotFoundError):
        return "the repository has no such file"
    return f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def download(repo_id: str, filename: str | None = None, *, revision: str | None = None,
             cache_dir: str | Path | None = None) -> Path:
    """Download one file (``filename``) or a repository snapshot; return its local path.

    A snapshot holds only safetensors, JSON, text and tokenizer-model files. Already cached
    files are reused (and are all that is used when ``HF_HUB_OFFLINE=1``).
    """
    try:
        if filename:
            local = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
        else:
            local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=SNAPSHOT_PATTERNS)
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as err:
        target = f"{repo_id}/{filename}" if filename else repo_id
        if filename:
            url = hf_hub_url(repo_id, filename, revision=revision)
            manual = (f"download {url} with a browser (or on a machine with network) and pass its local path "
                      "to diffstudio instead of the repository name")
        else:
            manual = (f"download the repository (https://huggingface.co/{repo_id}) on a machine with "
                      f"network, e.g. `hf download {repo_id}`, copy the folder here and pass its local path")
        raise ModelNotFoundError(f"could not get {target} from the Hugging Face Hub: {_reason(err)}. "
                                 f"To use it anyway, {manual}.") from err
    return Path(local)
