"""Prediction types: a raw network ``model(x_in, t, **cond) -> output`` becomes a denoiser
``D(x, sigma, **cond) -> x0`` (Karras et al. 2022, "EDM", sec. 5 and table 1: D = c_skip x + c_out F(c_in x)).

Two noise kinds, carried as ``.kind`` so that samplers that add noise know how:

* ``"ve"`` (discrete eps / v models): x = x0 + sigma * n. The network was trained on the
  variance-preserving sample x_vp = x / sqrt(sigma^2 + 1) at the timestep t whose training sigma is
  sigma (Ho et al. 2020; sigma = sqrt((1 - abar) / abar)).
* ``"flow"`` (rectified flow, SD3 / FLUX): x = (1 - s) x0 + s n, the network predicts the velocity
  v = n - x0 (Esser et al. 2024, eq. 2 and sec. 3.1), and takes t = s * multiplier.

Every denoiser also has ``.sigmas`` (the ascending table of training sigmas the schedules read),
``.sigma_min``, ``.sigma_max``, ``noise_scaling`` and its ``inverse``.
"""

from __future__ import annotations

import torch

from diffstudio.sampling import schedules


def per_item(sigma, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float tensor broadcastable against x: a number or 0-d tensor stays 0-d,
    a (B,) tensor becomes (B, 1, 1, ...)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    sigma = sigma.to(x.dtype if x.is_floating_point() else torch.float32)
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class _Discrete:
    """A model trained on a discrete DDPM schedule; subclasses say how its output becomes x0."""

    kind = "ve"
    prediction = ""

    def __init__(self, model, sigmas: torch.Tensor | None = None):
        self.model = model
        if sigmas is None:
            sigmas = schedules.model_sigmas(schedules.betas_scaled_linear())
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> torch.Tensor:
        return schedules.sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64).cpu(), self.sigmas)

    def t_to_sigma(self, t) -> torch.Tensor:
        return schedules.t_to_sigma(t, self.sigmas)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the way through sampling (0 = start, 1 = end), in training time:
        for ControlNet / guidance start and end points."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma((1.0 - percent) * (len(self.sigmas) - 1)))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        s = per_item(sigma, x)
        c_in = (s**2 + 1).rsqrt()
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        out = self.model(x * c_in, t, **cond)
        return self.to_x0(x, s, out.to(x.dtype))

    def to_x0(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x at noise level sigma from a clean latent: latent + sigma * noise."""
        return latent + per_item(sigma, noise) * noise

    def inverse(self, sigma, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The noise n with noise_scaling(sigma, n, latent) == x (sigma > 0)."""
        return (x - latent) / per_item(sigma, x)


class DiscreteEps(_Discrete):
    """eps-prediction (Ho et al. 2020): x0 = x - sigma * eps (c_skip = 1, c_out = -sigma)."""

    prediction = "eps"

    def to_x0(self, x, s, out):
        return x - s * out


class DiscreteV(_Discrete):
    """v-prediction (Salimans & Ho 2022, sec. 4): v = alpha n - sigma_vp x0 on the VP sample, with
    alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha. Then x0 = alpha x_vp - sigma_vp v, and with
    x_vp = alpha x: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
    (c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), EDM table 1 with sigma_data = 1)."""

    prediction = "v"

    def to_x0(self, x, s, out):
        return x / (s**2 + 1) - s * (s**2 + 1).rsqrt() * out


class Flow:
    """Rectified-flow velocity prediction (SD3, FLUX): x0 = x - s * v.

    The network sees x unscaled and t = s * multiplier (SD3: 1000, FLUX: 1, since its model
    multiplies by 1000 inside). ``shift`` is the family's static timestep shift; it only shapes the
    ``.sigmas`` table the discrete schedules read and the "flow" schedule (flow_sigmas).
    """

    kind = "flow"
    prediction = "flow"

    def __init__(self, model, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000):
        self.model = model
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.sigmas = schedules.flow_model_sigmas(self.shift, num_timesteps)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = 1.0

    def sigma_to_t(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64) * self.multiplier

    def t_to_sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(schedules.shift_sigmas(1.0 - percent, self.shift))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        t = (sigma.to(device=x.device, dtype=torch.float32) * self.multiplier)
        out = self.model(x, t, **cond)
        return x - per_item(sigma, x) * out.to(x.dtype)

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x at time s from a clean latent: (1 - s) latent + s noise."""
        s = per_item(sigma, noise)
        return (1 - s) * latent + s * noise

    def inverse(self, sigma, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The noise n with noise_scaling(s, n, latent) == x (s > 0)."""
        s = per_item(sigma, x)
        return (x - (1 - s) * latent) / s
