"""Token merging (ToMe for SD, Bolya and Hoffman 2023) as a denoiser module: every network call of the run hands the
UNet a ``TokenMerging`` (models/token_merge.py), and the self-attention of its highest-resolution transformers
runs on ``1 - ratio`` of the tokens.

A quality trade, off by default: ``Pipeline(models)(..., token_merging=0.5)`` or ``--tome 0.5``;
docs/benchmarks.md gives its measured speed-up at SD 1.5 size and its effect on the Shapes model's scores. The
destinations' places are drawn from a generator seeded with the run's seed, so a seed gives the same image.
"""

from __future__ import annotations

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.models.token_merge import TokenMerge, TokenMerging
from diffstudio.pipeline.modules import NETWORK, Generation, Wrapper


class TokenMergingModule:
    order = NETWORK + 1  # innermost, next to the network: every call (ControlNet-guided or not) is merged

    def __init__(self, ratio: float = 0.5, max_downsample: int = 1, stride: int = 2, random: bool = True):
        self.settings = TokenMerge(float(ratio), int(max_downsample), int(stride), bool(random))

    def wrap(self, denoiser, gen: Generation):
        net = gen.models.denoiser
        if not getattr(net, "supports_token_merge", False):
            raise InvalidInputError(f"token merging works on a UNet's transformers (SD 1.x, SDXL, Kolors); the "
                                    f"{gen.family.name} denoiser ({type(net).__name__}) has none: leave it off")
        generator = torch.Generator().manual_seed(int(gen.request.seed)) if self.settings.random else None
        return TokenMergingDenoiser(denoiser, TokenMerging(self.settings, generator))

    def recipe(self) -> dict:
        s = self.settings
        return {"token_merging": {"ratio": s.ratio, "max_downsample": s.max_downsample, "stride": s.stride,
                                  "random": s.random}}


class TokenMergingDenoiser(Wrapper):
    def __init__(self, inner, merging: TokenMerging):
        super().__init__(inner)
        self.merging = merging

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.inner(x, sigma, **cond, token_merge=self.merging)
