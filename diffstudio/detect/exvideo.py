"""Recognise an ExVideo-SVD extension file (models/exvideo_file.py) and derive its `ExVideoConfig` from shapes.

By structure: ``blocks.<i>.positional_embedding.embeddings`` tables (positions x width) with a
``positional_conv`` beside each; the fine-tuned temporal weights are present or not (``finetuned``).
Nothing else may be in the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffstudio.errors import UnknownModelError
from diffstudio.models.exvideo_file import ExVideoConfig

# The first temporal block of SVD's UNet is DiffSynth's block 7 (level 0's first ResBlock takes 0-4, its
# transformer group 5-9 with the temporal block at 7) for every config whose first level has attention.
EXVIDEO_SENTINELS = (
    "blocks.7.positional_embedding.embeddings",
    "blocks.7.positional_conv.weight",
)

_TABLE = re.compile(r"^blocks\.(\d+)\.positional_embedding\.embeddings$")


def is_exvideo_patch(keys) -> bool:
    return all(k in keys for k in EXVIDEO_SENTINELS)


def derive_exvideo_config(sd: Mapping, hints: Mapping | None = None) -> ExVideoConfig:
    """Extension file state dict (names + shapes) -> ExVideoConfig."""
    tables = sorted((int(m.group(1)), tuple(v.shape)) for k, v in sd.items() if (m := _TABLE.match(k)))
    if not tables:
        raise UnknownModelError("not an ExVideo-SVD extension: no blocks.<i>.positional_embedding.embeddings "
                                "tables. Pass the extension file (ExVideo-SVD-128f-v1's model.fp16.safetensors).")
    positions = {shape[0] for _, shape in tables}
    if len(positions) != 1:
        raise UnknownModelError(f"ExVideo extension tables have different lengths {sorted(positions)}; one expected")
    first = tables[0][0]
    finetuned = f"blocks.{first}.attn1.to_q.weight" in sd
    context = tuple(sd[f"blocks.{first}.attn2.to_k.weight"].shape)[1] if finetuned else \
        int(dict(hints or {}).get("context_dim", 1024))
    return ExVideoConfig(block_ids=[i for i, _ in tables], channels=[shape[1] for _, shape in tables],
                         positions=positions.pop(), context_dim=context, finetuned=finetuned)
