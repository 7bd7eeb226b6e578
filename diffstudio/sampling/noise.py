"""Seeded noise: the same seed gives the same image on every device and in every batch position.

One CPU ``torch.Generator`` per batch item (ARCHITECTURE.md, principle 8). Every draw takes one
float32 N(0, I) tensor of ``shape_per_item`` from each item's own generator, stacks them, then
casts and moves the batch to ``dtype`` / ``device``. So item i of a batch seeded [s, s+1, ...] is
bit-identical to a run of seed s+i alone, the noise does not depend on the device, and a float16
run sees the float32 run's noise rounded.

The first draw is the starting noise (``initial()``); each later call (``noise()``) is the fresh
noise of one stochastic sampler step, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SeededNoise:
    """``noise = SeededNoise([seed, seed + 1], (4, 64, 64))``; ``x_T = noise.initial()``; ``z = noise()``."""

    def __init__(self, seeds: Sequence[int], shape_per_item: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("SeededNoise needs at least one seed (one per batch item)")
        self.seeds = seeds
        self.shape_per_item = tuple(int(d) for d in shape_per_item)
        self.dtype = dtype
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.draws = 0

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, shape_per_item: Sequence[int], **kwargs) -> SeededNoise:
        """Seeds seed, seed + 1, ..., seed + batch_size - 1."""
        return cls([seed + i for i in range(batch_size)], shape_per_item, **kwargs)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.seeds), *self.shape_per_item)

    def _draw(self) -> torch.Tensor:
        items = [torch.randn(self.shape_per_item, generator=g, dtype=torch.float32) for g in self.generators]
        self.draws += 1
        return torch.stack(items).to(device=self.device, dtype=self.dtype)

    def initial(self) -> torch.Tensor:
        """The starting noise: the first draw of every generator."""
        if self.draws:
            raise RuntimeError("initial() must be the first draw of a SeededNoise; "
                               "make a new one to start over")
        return self._draw()

    def __call__(self) -> torch.Tensor:
        """The next noise of the sequence (one per stochastic sampler step)."""
        return self._draw()
