"""Classifier-free guidance on the first steps only: after a fraction of the schedule, the conditional prediction
alone, and the network evaluates only the conditional rows.

Guidance shapes the image's layout early, at high noise; late steps refine detail, where the guided and the
conditional predictions differ little (the observation behind guidance intervals, Kynkäänniemi et al. 2024,
and the "CFG truncation" of several UIs). Dropping the unconditional rows on the last ``1 - fraction`` of the
steps saves that share of half the network's work with CFG on.

It works at the network stage, so every guidance module (CFG) keeps its formula: on the late calls the
unconditional rows receive the conditional rows' prediction, and u + w (c - u) with u = c is c exactly.
Rows are paired in order (the k-th unconditional row with the k-th conditional one), as CFG stacks them.

Opt-in: ``Pipeline(models)(..., cfg_until=0.5)`` or ``--cfg-until 0.5``; docs/benchmarks.md gives its
speed-up and its effect on the Shapes model's scores.
"""

from __future__ import annotations

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.pipeline.modules import NEGATIVE_ROWS, NETWORK, Generation, Wrapper, mark_negative_rows


class CFGUntil:
    """Guidance while the step's sigma is above the schedule's sigma ``fraction`` of the way through (so the first
    ceil(fraction * steps) steps are guided); after that, one network row per image instead of two."""

    order = NETWORK + 40  # outside ControlNet, IP-Adapter and motion modules: they see the fewer rows too

    def __init__(self, fraction: float):
        if not 0.0 <= float(fraction) <= 1.0:
            raise InvalidInputError(f"cfg_until is the fraction of the steps with guidance, 0-1; got {fraction!r}")
        self.fraction = float(fraction)
        self.rows_evaluated = 0

    def wrap(self, denoiser, gen: Generation):
        mark_negative_rows(gen)
        self.rows_evaluated = 0
        return CFGUntilDenoiser(denoiser, self, gen.sigma_at(self.fraction) if self.fraction < 1 else -1.0)

    def recipe(self) -> dict:
        return {"cfg_until": self.fraction}


class CFGUntilDenoiser(Wrapper):
    def __init__(self, inner, module: CFGUntil, sigma_end: float):
        super().__init__(inner)
        self.module, self.sigma_end = module, sigma_end

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        negative = cond.get(NEGATIVE_ROWS)
        level = float(torch.as_tensor(sigma).reshape(-1)[0])
        if negative is None or not bool(negative.any()) or level > self.sigma_end * (1 + 1e-6):
            self.module.rows_evaluated += x.shape[0]
            return self.inner(x, sigma, **cond)
        positive = ~negative
        if int(negative.sum()) != int(positive.sum()):
            raise InvalidInputError("cfg_until pairs each unconditional row with a conditional one, but this call "
                                    f"has {int(positive.sum())} conditional and {int(negative.sum())} unconditional "
                                    "rows (region prompts?): leave cfg_until off for it")
        rows = x.shape[0]

        def take(value):
            return value[positive] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows \
                else value

        out = self.inner(x[positive], take(sigma), **{k: take(v) for k, v in cond.items()})
        self.module.rows_evaluated += out.shape[0]
        full = out.new_empty((rows, *out.shape[1:]))
        full[positive] = out
        full[negative] = out  # u = c: the guidance formula returns c
        return full
