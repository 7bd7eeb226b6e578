"""The Shapes image encoder: the tiny image encoder of the Shapes IP-Adapter (docs/ipadapter.md, "The Shapes
IP-Adapter").

It stands where the released IP-Adapters have a CLIP vision tower and answers the same calls
(``encoder(pixel_values=..., output_hidden_states=...)`` -> ``.image_embeds`` (B, E) and ``.hidden_states``;
``.config.image_size``, ``.projection_dim``, ``.hidden_size``), reading the same CLIP-normalised input, so the
IP-Adapter loader and pipeline use it unchanged.

What it sees is chosen for the Shapes world, whose shapes are always saturated and whose backgrounds never are
(docs/shapes.md): every pixel goes through the same small MLP (1x1 convolutions), and the features are averaged
with each pixel weighted by its chroma squared (max - min of its RGB). The pooled vector is then projected to
``projection_dim``. A per-pixel map pooled over all pixels cannot tell where a pixel was, so the encoder sees the
shapes' colours and nothing of their kind, place or background: an adapter fed by it carries colour (the
Shapes world's "style") and leaves kind and layout to the prompt (or a ControlNet).

Parameter names (in a file, under ``image_encoder.``): ``pixel.0`` and ``pixel.2`` (the 1x1 convolutions),
``proj`` (the projection).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
from torch import nn

from diffstudio.models.ipadapter import CLIP_MEAN, CLIP_STD


@dataclass
class ShapesImageEncoderConfig:
    """image_size: the side of the input (the pipeline fits each reference to it). hidden_size: the per-pixel
    features' width. projection_dim: the width of ``image_embeds``, what a base IP-Adapter reads."""

    image_size: int = 64
    hidden_size: int = 32
    projection_dim: int = 64
    chroma_power: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShapesImageEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ShapesImageEncoderConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class ShapesImageEncoder(nn.Module):
    """(B, 3, S, S) CLIP-normalised pixels -> ``image_embeds`` (B, projection_dim); see the module docstring."""

    def __init__(self, config: ShapesImageEncoderConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.pixel = nn.Sequential(nn.Conv2d(3, width, 1), nn.GELU(), nn.Conv2d(width, width, 1), nn.GELU())
        self.proj = nn.Linear(width, config.projection_dim)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        mean, std = (torch.tensor(t, device=pixel_values.device, dtype=pixel_values.dtype).view(1, 3, 1, 1)
                     for t in (CLIP_MEAN, CLIP_STD))
        rgb = (pixel_values * std + mean).clamp(0, 1)                            # (B, 3, S, S) in [0, 1]
        chroma = rgb.amax(dim=1, keepdim=True) - rgb.amin(dim=1, keepdim=True)    # (B, 1, S, S)
        weight = chroma ** self.config.chroma_power
        first = self.pixel[1](self.pixel[0](pixel_values))                       # (B, W, S, S)
        features = self.pixel[3](self.pixel[2](first))                           # (B, W, S, S)
        pooled = (features * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)  # (B, W)
        out = SimpleNamespace(image_embeds=self.proj(pooled), hidden_states=None)
        if output_hidden_states:  # per-pixel tokens (B, S*S, W) of both layers, as a ViT's are per patch
            out.hidden_states = tuple(h.flatten(2).transpose(1, 2) for h in (first, features))
        return out
