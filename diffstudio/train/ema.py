"""An exponential moving average of the trainable parameters (Polyak averaging), kept beside the training loop.

After every optimizer step each tracked tensor becomes ``ema = decay * ema + (1 - decay) * param`` (in float32,
whatever the parameter's dtype), starting from the parameters' values at step 0. ``train.loop.train`` updates it and
stores it in each checkpoint, so a resumed run's average equals an uninterrupted run's; a trainer exports the
average instead of the last weights.
"""

from __future__ import annotations

import torch
from torch import nn

from diffstudio.errors import InvalidInputError


class EMA:
    """``EMA(module, decay)``: the average of ``module``'s parameters that require grad, by name."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise InvalidInputError(f"the EMA decay is in [0, 1), got {decay}")
        self.decay = float(decay)
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            from diffstudio.errors import CorruptFileError

            raise CorruptFileError("the checkpoint's EMA does not track this run's parameters; discard it "
                                   "(--restart) or train in another work folder")
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
