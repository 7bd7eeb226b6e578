"""DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse a UNet's deep
features across neighbouring network calls.

Between adjacent sampling steps the high-level features of a UNet's deep blocks change little, while the shallow
blocks carry the detail that does change. So one network call in ``reuse + 1`` is a full pass, which stores the
input of the output block paired (by the skip connection) with input block ``branch``; the ``reuse`` calls after
it compute only input blocks ``0..branch`` and the output blocks from that pair on, starting from the stored
feature (the paper's uniform 1:N strategy, N = reuse + 1). With ``branch = 0`` a reused call runs conv_in, the
last output block and the output head: a small fraction of the network.

It is a quality trade, off by default: ``Pipeline(models)(..., deep_cache=2)`` or ``--deep-cache 2`` on the
command line; docs/benchmarks.md gives its measured speed-up and its effect on the Shapes model's scores. The
network must offer the hook (``supports_feature_cache``: the LDM UNet of SD 1.x, SDXL and Kolors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import NETWORK, Generation, Wrapper


@dataclass
class FeatureSlot:
    """One cached feature: what the UNet's ``feature_cache`` hook reads and writes (models/unet.py)."""

    branch: int
    feature: torch.Tensor | None = None
    reuse: bool = False
    calls: int = 0


class DeepCache:
    """Reuse the deep features of the last full network call for the next ``reuse`` calls (module docstring).

    Calls are told apart by their batch shape and their place in a larger latent (a tile, a window of
    frames): each such place has its own cache and its own count, so a change of batch (CFG switched off
    for the last steps, a new tile) starts with a full pass."""

    order = NETWORK + 1  # innermost: the other network modules' conditioning reaches the partial pass too

    def __init__(self, reuse: int = 2, branch: int = 0):
        if not isinstance(reuse, int) or reuse < 1:
            raise InvalidInputError(f"deep_cache: reuse must be a whole number of calls >= 1, got {reuse!r}")
        if not isinstance(branch, int) or branch < 0:
            raise InvalidInputError(f"deep_cache: branch must be an input block index >= 0, got {branch!r}")
        self.reuse, self.branch = reuse, branch
        self.full_calls = self.reused_calls = 0

    def wrap(self, denoiser, gen: Generation):
        net = gen.models.denoiser
        if not getattr(net, "supports_feature_cache", False):
            raise InvalidInputError(f"deep_cache needs a UNet (SD 1.x, SDXL, Kolors); the {gen.family.name} "
                                    f"denoiser ({type(net).__name__}) has no deep/shallow split: leave it off")
        blocks = len(net.input_blocks)
        if self.branch > blocks - 2:
            raise InvalidInputError(f"deep_cache: branch {self.branch} leaves no deep blocks to skip in this UNet "
                                    f"({blocks} input blocks): use 0..{blocks - 2}")
        self.full_calls = self.reused_calls = 0
        return DeepCacheDenoiser(denoiser, self)

    def recipe(self) -> dict:
        return {"deep_cache": {"reuse": self.reuse, "branch": self.branch}}


class DeepCacheDenoiser(Wrapper):
    def __init__(self, inner, cache: DeepCache):
        super().__init__(inner)
        self.cache = cache
        self.slots: dict[tuple, FeatureSlot] = {}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        key = (tuple(x.shape), repr(cond.get("tile")), repr(cond.get("frames")))
        slot = self.slots.setdefault(key, FeatureSlot(self.cache.branch))
        slot.reuse = slot.feature is not None and slot.calls % (self.cache.reuse + 1) != 0
        slot.calls += 1
        if slot.reuse:
            self.cache.reused_calls += 1
        else:
            self.cache.full_calls += 1
        return self.inner(x, sigma, **cond, feature_cache=slot)
