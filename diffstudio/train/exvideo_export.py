"""Writing a trained ExVideo-SVD extension in the released layout (models/exvideo_file.py: DiffSynth-Studio's
``blocks.<i>.positional_embedding.embeddings``, ``blocks.<i>.positional_conv``, and with the temporal blocks their
``positional_embedding_proj`` / ``norm_in`` / ``attn1`` / ... weights), so that ``graft_exvideo`` and
``diffstudio.load(svd, ext)`` read it back like the release.

Our UNet's names go to the file's through the same rule list that grafting reads with (``convert.exvideo``), and
every tensor handed in must find its place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstudio.convert.exvideo import exvideo_rules
from diffstudio.convert.rules import apply_to_theirs
from diffstudio.errors import ConversionError

TRAINING_KEY = "diffstudio.exvideo_training"


def exvideo_file_tensors(unet, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{our UNet name: tensor} of the extension's parameters -> {file name: tensor in ``dtype``}."""
    done = apply_to_theirs(weights, exvideo_rules(unet.config))
    left = sorted(set(weights) - set(done.consumed))
    if left or done.problems:
        raise ConversionError(f"these parameters have no place in the ExVideo layout: {left[:4]} "
                              f"{'; '.join(done.problems[:2])}")
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in done.out.items()}


def save_exvideo(unet, weights: dict[str, torch.Tensor], out: str | Path, dtype: torch.dtype,
                 training: dict | None = None) -> Path:
    """Write the extension (atomically) with its ExVideoConfig and ``training`` (JSON-able, the recipe) in the
    safetensors metadata."""
    from diffstudio.detect.exvideo import derive_exvideo_config
    from diffstudio.io.safetensors_file import save_safetensors

    tensors = exvideo_file_tensors(unet, weights, dtype)
    config = derive_exvideo_config(tensors, {"context_dim": unet.config.context_dim})
    metadata = {"diffstudio": {"configs": {"exvideo": config.to_dict()}}}
    if training is not None:
        metadata[TRAINING_KEY] = training
    return save_safetensors(tensors, out, metadata=metadata)


def exvideo_training_info(path: str | Path) -> dict:
    """The training record of a file this trainer wrote ({} for other files)."""
    from diffstudio.io import read_file_metadata

    value = (read_file_metadata(path) or {}).get(TRAINING_KEY)
    return json.loads(value) if isinstance(value, str) else dict(value or {})
