"""What the blending modes ask of a remapper, and the patch-matching one they normally get.

Every mode is written against two calls: ``pairs`` (remap each source into its own target) and
``consensus`` (remap many sources into one target, matched against the window's consensus). Tests
swap in an oracle that returns the sources unchanged, which isolates each mode's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.video.fastblend.patch_match import MatchConfig, PatchMatcher, pair_seed

# On a CPU, batching pairs only pays while a batch is small enough to stay in cache: bigger frames
# are matched a few at a time (measured: 512x512 pairs take ~25% longer in batches of 8 than
# alone, and 3x the memory; 128x128 pairs take half as long in batches of 8). GPUs take batch_size.
CPU_PIXELS_PER_CHUNK = 512 * 512


class Remapper(Protocol):
    def pairs(self, src_guide: torch.Tensor, src_style: torch.Tensor, tgt_guide: torch.Tensor,
              tgt_style: torch.Tensor | None, keys: Sequence[tuple[int, ...]],
              tracks: Sequence[int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) sources remapped into their (B, 3, H, W) targets -> (B, 3, H, W) floats.

        Images come as uint8 or as floats in [0, 1] (modes pass uint8: 4x less memory per batch).

        ``keys`` name each pair (frame indices) and seed its random search; ``tracks`` group
        consecutive pairs for tracking. ``tgt_style`` None: the targets' style is unknown."""
        ...

    def consensus(self, src_guide: torch.Tensor, src_style: torch.Tensor, tgt_guide: torch.Tensor,
                  tgt_style: torch.Tensor, keys: Sequence[tuple[int, ...]],
                  tracks: Sequence[int] | None = None) -> torch.Tensor:
        """Mean of the target's style (1, 3, H, W) and all B sources remapped into it -> (1, 3, H, W)."""
        ...


class PatchMatchRemapper:
    """The real remapper: pyramid patch matching and the voting remap, ``batch_size`` pairs at once."""

    def __init__(self, config: MatchConfig, seed: int = 0, batch_size: int = 8):
        if batch_size < 1:
            raise InvalidInputError(f"batch_size (frame pairs matched at once) must be at least 1, got {batch_size}")
        self.matcher = PatchMatcher(config)
        self.seed = seed
        self.batch_size = batch_size

    def _seeds(self, keys: Sequence[tuple[int, ...]]) -> list[int]:
        return [pair_seed(self.seed, *key) for key in keys]

    def chunk_size(self, images: torch.Tensor) -> int:
        """Pairs matched at once: batch_size, fewer for large frames on a CPU (but tracking shares
        matches only within a batch, so it keeps the whole batch)."""
        if images.device.type != "cpu" or self.matcher.config.tracking_window_size > 0:
            return self.batch_size
        return max(1, min(self.batch_size, CPU_PIXELS_PER_CHUNK // (images.shape[2] * images.shape[3])))

    def pairs(self, src_guide, src_style, tgt_guide, tgt_style, keys, tracks=None):
        outputs = []
        chunk = self.chunk_size(src_guide)
        for start in range(0, src_guide.shape[0], chunk):
            part = slice(start, start + chunk)
            remapped, _ = self.matcher.match(
                src_guide[part], src_style[part], tgt_guide[part],
                None if tgt_style is None else tgt_style[part], self._seeds(keys[part]),
                tracks=None if tracks is None else tracks[part])
            outputs.append(remapped)
        return torch.cat(outputs, 0)

    def consensus(self, src_guide, src_style, tgt_guide, tgt_style, keys, tracks=None):
        remapped, _ = self.matcher.match(src_guide, src_style, tgt_guide, tgt_style, self._seeds(keys),
                                         tracks=tracks, consensus=True, chunk_size=self.chunk_size(src_guide))
        return remapped
