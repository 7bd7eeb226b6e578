"""A trainer's cache of what the frozen parts (VAE, text encoders) make of its data, kept in the work folder.

The cache is tagged with a key (a hash of what it depends on) and rebuilt when the key differs. It is written
beside its final name and renamed into place, so a failed write leaves the old cache whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch


def load_or_build(path: str | Path, key: str, build: Callable[[], dict]) -> dict:
    """The dict cached at ``path`` if its ``"key"`` is ``key``, else ``build()`` (then stored with the key)."""
    path = Path(path)
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached
    data = build()
    data["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data
