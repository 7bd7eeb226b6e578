"""Caption conditioning for trainers: what the frozen text encoders make of a caption, and batching it.

Every trainer encodes its captions once (the text encoders are frozen) with the settings the pipeline would use
at sampling time: the family's default clip skip and the model's default guidance (FLUX dev embeds it).
"""

from __future__ import annotations

from dataclasses import asdict

import torch


def caption_encoder(models):
    """``encode(caption, (width, height)) -> conditioning dict`` (tensors with batch dimension 1), no grad."""
    family = models.family
    clip_skip = family.text_encoders[0].default_clip_skip
    guidance = {**asdict(family.defaults), **models.defaults}.get("guidance")

    def encode(caption: str, size: tuple[int, int]) -> dict:
        with torch.no_grad():
            return family.make_conditioning(models, [caption], clip_skip=clip_skip, width=size[0], height=size[1],
                                            guidance=guidance)

    return encode


def collate(conds: list[dict]) -> dict:
    """Conditioning dicts of batch 1 -> one dict of the batch (tensors concatenated, other values the first's)."""
    out = {}
    for key, value in conds[0].items():
        out[key] = torch.cat([c[key] for c in conds]) if isinstance(value, torch.Tensor) else value
    return out
