"""A raw network ``model(x_in, t, **cond) -> output`` plus a prediction object (prediction.py) becomes a
denoiser ``D(x, sigma, **cond) -> x0`` — k-diffusion's contract, which every sampler and every pipeline
module (CFG, regions, ControlNet, context windows, ...) speaks.

Every denoiser exposes its prediction's ``kind``, ``sigmas``, ``sigma_min``, ``sigma_max``,
``noise_scaling``, ``inverse``, ``sigma_to_t`` and ``t_to_sigma`` (through ``__getattr__``), so a
wrapper that forwards unknown attributes to the denoiser it wraps is itself a denoiser.
"""

from __future__ import annotations

import torch

from diffstudio.sampling import prediction as _prediction
from diffstudio.sampling.prediction import Eps, Prediction, V, per_item

__all__ = ["Denoiser", "DiscreteEps", "DiscreteV", "FlowDenoiser", "per_item"]


class Denoiser:
    """``D(x, sigma, **cond) = prediction.to_x0(x, sigma, model(*prediction.network_input(x, sigma), **cond))``."""

    def __init__(self, model, prediction: Prediction):
        self.model = model
        self.prediction = prediction

    def __getattr__(self, name):  # kind, sigmas, noise_scaling, ... of the prediction
        return getattr(self.__dict__["prediction"], name)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        x_in, t = self.prediction.network_input(x, sigma)
        out = self.model(x_in, t, **cond)
        return self.prediction.to_x0(x, sigma, out.to(x.dtype))


def DiscreteEps(model, sigmas: torch.Tensor | None = None) -> Denoiser:  # noqa: N802 (a denoiser "class")
    """An eps-prediction model on a table of training sigmas (default: SD's scaled-linear schedule)."""
    return Denoiser(model, Eps(sigmas))


def DiscreteV(model, sigmas: torch.Tensor | None = None) -> Denoiser:  # noqa: N802
    """A v-prediction model on a table of training sigmas."""
    return Denoiser(model, V(sigmas))


def FlowDenoiser(model, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000) -> Denoiser:
    """A rectified-flow velocity model (SD3, FLUX)."""
    return Denoiser(model, _prediction.Flow(shift, multiplier, num_timesteps))


Flow = FlowDenoiser  # the k-diffusion-style name `sampling.Flow` exports
