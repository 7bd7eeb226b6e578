"""Emphasis: per-token weights applied to the encoder's hidden states (A1111's formula).

For one encoded chunk z (T tokens x C features) with token weights w (T,):

    "original" (default, A1111's "Original"):  z' = z * w[:, None],  then  z'' = z' * mean(z) / mean(z')
    "no_norm"  (A1111's "No norm"):            z' = z * w[:, None]
    "ignore"   (A1111's "Ignore"):             z   (the syntax is still parsed and removed)

Means are over the whole chunk (every token and feature), computed in float32. The rescaling keeps
the chunk's mean where the unweighted encoding had it, so weights change the *relative* scale of
tokens. One difference from A1111, on purpose: A1111 takes the means over all prompts of a batch at
that chunk index, which makes a prompt's conditioning depend on its batch neighbours; here each
prompt's chunk is normalised on its own (the same as A1111 for a batch of one).

A chunk whose weights are all 1 is returned untouched (bit-identical to not weighting).

Every encoder applies this one function (CLIP per 77-token chunk; T5, mT5, BERT and ChatGLM per
sequence or chunk). For encoders whose padding the denoiser never sees (Hunyuan-DiT's BERT and mT5
run with an attention mask and the DiT replaces padded positions), ``mask`` limits both means to the
positions it marks, so the restored mean is that of the tokens the denoiser reads.
"""

from __future__ import annotations

import torch

EMPHASIS_MODES = ("original", "no_norm", "ignore")


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, mode: str = "original",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden`` (rows, T, C) and ``weights`` (rows, T) -> weighted hidden states, same dtype.

    ``mask`` (rows, T), optional: the positions the means are taken over (default: all)."""
    if mode not in EMPHASIS_MODES:
        raise ValueError(f"unknown emphasis mode {mode!r}; choose one of {', '.join(EMPHASIS_MODES)}")
    weights = weights.to(hidden.device, torch.float32)
    weighted_rows = (weights != 1).any(dim=1)
    if mode == "ignore" or not bool(weighted_rows.any()):
        return hidden
    z = hidden[weighted_rows].float()
    scaled = z * weights[weighted_rows][..., None]
    if mode == "original":
        kept = None if mask is None else mask[weighted_rows].to(hidden.device, torch.float32)[..., None]
        scaled = scaled * (_mean(z, kept) / _mean(scaled, kept))
    out = hidden.clone()
    out[weighted_rows] = scaled.to(hidden.dtype)
    return out


def _mean(z: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Mean of each row of ``z`` (rows, T, C) over every feature of the positions ``kept`` (rows, T, 1) marks."""
    if kept is None:
        return z.mean(dim=(1, 2), keepdim=True)
    return (z * kept).sum(dim=(1, 2), keepdim=True) / (kept.sum(dim=(1, 2), keepdim=True) * z.shape[-1])
