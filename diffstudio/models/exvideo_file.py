"""The layout of a released ExVideo-SVD extension file (``ExVideo-SVD-128f-v1``'s ``model.fp16.safetensors``).

The file holds the trained parameters of DiffSynth-Studio's ``TemporalAttentionBlock`` modules under that
project's names, ``blocks.<i>.<parameter>``, where i counts DiffSynth's flat list of SVD UNet blocks (7, 17, 29,
... 195 for SVD-XT; ``convert/exvideo.diffsynth_temporal_blocks`` derives them from the UNet config). Per block:

    positional_embedding.embeddings   (positions, C)  the trained position table          (new in ExVideo)
    positional_conv.weight / .bias    (C, C, 3, 3, 3) the reflect-padded 3x3x3 convolution  (new in ExVideo)
    positional_embedding_proj.0 / .2  SVD's time_pos_embed, fine-tuned
    norm_in, act_fn_in.proj, ff_in, norm1, attn1.to_q/k/v/out, norm2, attn2.to_q/k/v/out, norm_out,
    act_fn_out.proj, ff_out           SVD's temporal transformer block (time_stack.0), fine-tuned

`ExVideoPatch` is a container with exactly these names and shapes (it does not run): detection, the full-size
meta checks and synthetic test files are built from it. A file with only the two new tensors per block
(``finetuned=False``) is the same layout without the fine-tuned part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn


@dataclass
class ExVideoConfig:
    """block_ids: DiffSynth's index of each temporal block; channels: its width; positions: table rows;
    context_dim: the temporal cross-attention's key width (the image embedding, 1024); finetuned: whether the
    file carries the temporal blocks' own weights too."""

    block_ids: list[int]
    channels: list[int]
    positions: int = 128
    context_dim: int = 1024
    finetuned: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExVideoConfig:
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ValueError(f"ExVideoConfig: unknown fields {sorted(set(data) - known)}; known: {sorted(known)}")
        return cls(**data)


class _Table(nn.Module):
    def __init__(self, positions: int, channels: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(positions, channels))


class _Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)


class _GEGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim * 8)


class ExVideoBlockFile(nn.Module):
    """One ``blocks.<i>`` entry of the file."""

    def __init__(self, channels: int, positions: int, context_dim: int, finetuned: bool):
        super().__init__()
        c = channels
        self.positional_embedding = _Table(positions, c)
        self.positional_conv = nn.Conv3d(c, c, 3, padding=1, padding_mode="reflect")
        if finetuned:
            self.positional_embedding_proj = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
            self.norm_in, self.act_fn_in, self.ff_in = nn.LayerNorm(c), _GEGLU(c), nn.Linear(4 * c, c)
            self.norm1, self.attn1 = nn.LayerNorm(c), _Attention(c, c)
            self.norm2, self.attn2 = nn.LayerNorm(c), _Attention(c, context_dim)
            self.norm_out, self.act_fn_out, self.ff_out = nn.LayerNorm(c), _GEGLU(c), nn.Linear(4 * c, c)


class ExVideoPatch(nn.Module):
    """The file's layout as modules (a weight container; grafting runs them inside the SVD UNet)."""

    def __init__(self, config: ExVideoConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleDict({str(i): ExVideoBlockFile(c, config.positions, config.context_dim,
                                                              config.finetuned)
                                     for i, c in zip(config.block_ids, config.channels)})

    def forward(self, *args, **kwargs):
        raise TypeError("ExVideoPatch only holds an extension file's weights; graft it onto an SVD UNet with "
                        "diffstudio.exvideo_loading.graft_exvideo")
