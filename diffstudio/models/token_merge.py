"""Token merging for Stable Diffusion (Bolya and Hoffman 2023, "Token Merging for Fast Stable Diffusion", ToMe for
SD): the self-attention of a UNet transformer block runs on fewer tokens.

Before a block's self-attention, the H x W tokens are split into destinations (one per ``stride`` x ``stride``
window, at a random place in the window) and sources (the rest). Each source finds its most similar destination
(cosine similarity of the block's input); the ``r`` sources with the best matches are averaged into their
destinations (bipartite soft matching, the paper's section 3), so attention sees N - r tokens. Afterwards
"unmerging" gives every merged source its destination's output, so the block still returns N tokens. Only the
self-attention is merged (the paper's recommended setting: merging cross-attention or the MLP costs more quality
than it saves), and only in blocks whose grid is downsampled at most ``max_downsample`` times relative to the
latent (1: the highest-resolution blocks, where the tokens are many and attention costs most).

The matching follows the released ``tomesd`` exactly (compared in tests/test_token_merge.py): the random choice of
each window's destination is one ``torch.randint(stride**2, (H // stride, W // stride, 1))`` draw, rows of an odd
batch use the window's first place (the reference's rule: an odd batch cannot hold a prompted and an unprompted
image side by side), r = int(N * ratio), and a grid that ``stride`` does not divide leaves its last row/column
as sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffstudio.errors import InvalidInputError


@dataclass(frozen=True)
class TokenMerge:
    """ToMe's settings. ``ratio``: the share of a block's tokens merged away (at most 1 - 1 / stride**2)."""

    ratio: float = 0.5
    max_downsample: int = 1
    stride: int = 2
    random: bool = True

    def __post_init__(self):
        if not 0 <= self.ratio <= 1 - 1 / self.stride ** 2:
            raise InvalidInputError(f"token merging ratio {self.ratio}: use 0 .. {1 - 1 / self.stride ** 2:g} "
                                    f"(one token of each {self.stride}x{self.stride} window stays)")
        if self.max_downsample not in (1, 2, 4, 8):
            raise InvalidInputError(f"token merging max_downsample {self.max_downsample}: use 1, 2, 4 or 8")


class MergePlan:
    """``merge(x)``: (B, N, C) -> (B, N - r, C); ``unmerge(y)``: (B, N - r, C) -> (B, N, C)."""

    def __init__(self, metric: torch.Tensor, height: int, width: int, r: int, stride: int,
                 generator: torch.Generator | None):
        b, n, _ = metric.shape
        self.n = n
        rows, cols = height // stride, width // stride
        if generator is None:
            place = torch.zeros(rows, cols, 1, dtype=torch.long)
        else:
            place = torch.randint(stride * stride, (rows, cols, 1), generator=generator)
        window = torch.zeros(rows, cols, stride * stride, dtype=torch.bool).scatter_(2, place, True)
        grid = torch.zeros(height, width, dtype=torch.bool)
        grid[:rows * stride, :cols * stride] = window.view(rows, cols, stride, stride).transpose(1, 2).reshape(
            rows * stride, cols * stride)
        flat = grid.flatten().to(metric.device)
        self.dst = flat.nonzero().squeeze(1)  # destinations and sources, each in raster order
        self.src = (~flat).nonzero().squeeze(1)
        with torch.no_grad():
            metric = metric.float()  # the matching in fp32: CPU bf16 batched matmuls of this shape are slow
            unit = metric / metric.norm(dim=-1, keepdim=True)
            scores = unit[:, self.src] @ unit[:, self.dst].transpose(1, 2)  # (B, sources, destinations)
            self.r = min(r, len(self.src))
            best, best_dst = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)
            self.merged = order[:, :self.r]  # sources averaged into a destination, best matches first
            self.kept = order[:, self.r:]
            self.target = best_dst.gather(1, self.merged)  # (B, r): each merged source's destination

    @staticmethod
    def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        sources, destinations = x[:, self.src], x[:, self.dst]
        moved = self._rows(sources, self.merged)
        index = self.target.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        destinations = destinations.scatter_reduce(1, index, moved, reduce="mean")  # the mean includes itself
        return torch.cat([self._rows(sources, self.kept), destinations], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, c = y.shape
        kept, destinations = y[:, :self.kept.shape[1]], y[:, self.kept.shape[1]:]
        out = y.new_empty(b, self.n, c)
        out[:, self.dst] = destinations
        src = self.src.expand(b, -1)
        out.scatter_(1, src.gather(1, self.kept).unsqueeze(-1).expand(-1, -1, c), kept)
        out.scatter_(1, src.gather(1, self.merged).unsqueeze(-1).expand(-1, -1, c),
                     self._rows(destinations, self.target))
        return out


class TokenMerging:
    """A run's merging: the settings and the generator of the destinations' places (owned by the run, so a seed
    gives the same image); ``at(size)`` binds one network call's latent size, which tells each block its
    downsampling."""

    def __init__(self, settings: TokenMerge, generator: torch.Generator | None = None,
                 latent_size: tuple[int, int] | None = None):
        self.settings, self.generator, self.latent_size = settings, generator, latent_size

    def at(self, latent_size) -> TokenMerging:
        return TokenMerging(self.settings, self.generator, tuple(int(v) for v in latent_size))

    def plan(self, x: torch.Tensor) -> MergePlan | None:
        """The merge for a block whose input is ``x`` (B, N, C), or None where the block is not merged."""
        s = self.settings
        height, width = self.latent_size
        n = x.shape[1]
        downsample = math.ceil(math.sqrt(height * width // n))
        r = int(n * s.ratio)
        if downsample > s.max_downsample or r <= 0:
            return None
        generator = self.generator if s.random and x.shape[0] % 2 == 0 else None
        return MergePlan(x, math.ceil(height / downsample), math.ceil(width / downsample), r, s.stride, generator)
