"""Prediction types: one object per type (eps, v, flow) that owns all of its noising arithmetic.

Sampling, LoRA training and the demo build all go through these objects (ComfyUI's ``model_sampling``):

* noise a clean latent to a level, and back (``noise_scaling`` / ``inverse``), in the sampler's space;
* what the network sees at a level (``network_input``: scaled input and timestep) and how its output
  becomes x0 (``to_x0``) — Karras et al. 2022 ("EDM"), sec. 5 and table 1: D = c_skip x + c_out F(c_in x);
* the training pair at a training level (``training_input``, ``training_target``) and Min-SNR weights;
* sigma <-> training timestep (``sigma_to_t`` / ``t_to_sigma``).

Two noise kinds, carried as ``.kind`` so that samplers that add noise know how:

* ``"ve"`` (discrete eps / v models): the sampler's x = x0 + sigma * n. The network was trained on the
  variance-preserving sample x_vp = sqrt(abar) x0 + sqrt(1 - abar) n = x / sqrt(sigma^2 + 1) at the
  timestep t whose training sigma is sigma (Ho et al. 2020; sigma = sqrt((1 - abar) / abar)).
* ``"flow"`` (rectified flow, SD3 / FLUX): x = (1 - s) x0 + s n; the network predicts the velocity
  v = n - x0 (Esser et al. 2024, eq. 2 and sec. 3.1) and takes t = s * multiplier.
"""

from __future__ import annotations

import math

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


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in ``like``'s dtype and device."""
    return values.to(like).view(values.shape[0], *([1] * (like.ndim - 1)))


class Prediction:
    """The arithmetic of one prediction type; subclasses fill in the formulas."""

    name = ""
    kind = ""
    sigmas: torch.Tensor  # ascending table of training sigmas (what the sampling schedules read)
    sigma_min: float
    sigma_max: float

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


class Discrete(Prediction):
    """A model trained on a discrete DDPM schedule of ``len(alphas_cumprod)`` timesteps."""

    kind = "ve"

    def __init__(self, sigmas: torch.Tensor | None = None, *, betas: torch.Tensor | None = None):
        if betas is not None:
            abar = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
            sigmas = schedules.model_sigmas(betas)
        else:
            sigmas = schedules.model_sigmas(schedules.betas_scaled_linear()) if sigmas is None else sigmas
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
            abar = 1.0 / (1.0 + sigmas**2)
        self.alphas_cumprod = abar.float()  # training: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    # -- time -----------------------------------------------------------------------------------
    def sigma_to_t(self, sigma) -> torch.Tensor:
        return schedules.sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64).cpu(), self.sigmas)

    def t_to_sigma(self, t) -> torch.Tensor:
        return schedules.t_to_sigma(t, self.sigmas)

    # -- sampling -------------------------------------------------------------------------------
    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x at noise level sigma from a clean latent: latent + sigma * noise."""
        return latent + per_item(sigma, noise) * noise

    def inverse(self, sigma, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The noise n with noise_scaling(sigma, n, latent) == x (sigma > 0)."""
        return (x - latent) / per_item(sigma, x)

    def network_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_vp = x / sqrt(sigma^2 + 1), fractional timestep t) for sigma of shape (B,)."""
        s = per_item(sigma, x)
        t = self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        return x * (s**2 + 1).rsqrt(), t

    def to_x0(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------
    def training_levels(self, n: int, gen: torch.Generator, low: int = 0) -> torch.Tensor:
        """n timesteps drawn uniformly from {low, ..., T - 1}."""
        return torch.randint(low, len(self.alphas_cumprod), (n,), generator=gen)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[t]
        return _rows(abar.sqrt(), like), _rows((1 - abar).sqrt(), like)

    def training_input(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, timestep) the network is trained on at timesteps t: x_t = sqrt(abar) x0 + sqrt(1 - abar) n,
        the variance-preserving form of noise_scaling(sigma_t, n, x0) (same sample, divided by sqrt(sigma^2 + 1))."""
        a, s = self._ab(t, x0)
        return a * x0 + s * noise, t.float().to(x0.device)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 read back from the network's output on a training sample."""
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t]
        return abar / (1 - abar)


class Eps(Discrete):
    """eps-prediction (Ho et al. 2020): x0 = x - sigma * eps (c_skip = 1, c_out = -sigma)."""

    name = "eps"

    def to_x0(self, x, sigma, out):
        return x - per_item(sigma, x) * out

    def training_target(self, x0, noise, t):
        return noise

    def training_x0(self, x_t, t, out):
        a, s = self._ab(t, x_t)
        return (x_t - s * out) / a

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023, eq. 9) for an eps loss: min(SNR, gamma) / SNR."""
        snr = self.snr(t)
        return snr.clamp(max=gamma) / snr


class V(Discrete):
    """v-prediction (Salimans & Ho 2022, sec. 4): v = alpha n - sigma_vp x0 on the VP sample, with
    alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha. Then x0 = alpha x_vp - sigma_vp v, and with
    x_vp = alpha x: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
    (c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), EDM table 1 with sigma_data = 1)."""

    name = "v"

    def to_x0(self, x, sigma, out):
        s = per_item(sigma, x)
        return x / (s**2 + 1) - s * (s**2 + 1).rsqrt() * out

    def training_target(self, x0, noise, t):
        a, s = self._ab(t, x0)
        return a * noise - s * x0

    def training_x0(self, x_t, t, out):
        a, s = self._ab(t, x_t)
        return a * x_t - s * out

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma for a v loss: min(SNR, gamma) / (SNR + 1)."""
        snr = self.snr(t)
        return snr.clamp(max=gamma) / (snr + 1)


class Flow(Prediction):
    """Rectified-flow velocity prediction (SD3, FLUX): x0 = x - s * v.

    The network sees x unscaled and t = s * multiplier (SD3: 1000, FLUX: 1, since its model
    multiplies by 1000 inside). ``shift`` is the family's static timestep shift; it only shapes the
    ``.sigmas`` table the discrete schedules read and the "flow" schedule (flow_sigmas).
    Training draws s from a logit-normal distribution (Esser et al. 2024, sec. 3.1).
    """

    kind = "flow"
    name = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000):
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.sigmas = schedules.flow_model_sigmas(self.shift, num_timesteps)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = 1.0

    def sigma_to_t(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64) * self.multiplier

    def t_to_sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.multiplier

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x at time s from a clean latent: (1 - s) latent + s noise."""
        s = per_item(sigma, noise)
        return (1 - s) * latent + s * noise

    def inverse(self, sigma, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The noise n with noise_scaling(s, n, latent) == x (s > 0)."""
        s = per_item(sigma, x)
        return (x - (1 - s) * latent) / s

    def network_input(self, x, sigma):
        return x, sigma.to(device=x.device, dtype=torch.float32) * self.multiplier

    def to_x0(self, x, sigma, out):
        return x - per_item(sigma, x) * out

    def training_levels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(torch.randn(n, generator=gen))

    def training_input(self, x0, noise, s):
        return self.noise_scaling(_rows(s, x0), noise, x0), s.to(x0) * self.multiplier

    def training_target(self, x0, noise, s):
        return noise - x0

    def training_x0(self, x_t, s, out):
        return x_t - _rows(s, x_t) * out


class EDMV(Prediction):
    """Continuous-time v-prediction with EDM's preconditioning (Stable Video Diffusion; Karras et al. 2022,
    table 1 with sigma_data = 1): D = c_skip x + c_out F(c_in x, c_noise), c_skip = 1 / (sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1), c_noise = ln(sigma) / 4
    (generative-models' ``VScalingWithEDMcNoise``). Noise enters as for the discrete models (x = x0 + sigma n);
    the levels are continuous in [sigma_min, sigma_max] (SVD: 0.002, 700), and ``sigmas`` is a log-even table
    of them for the schedules that read one."""

    kind = "ve"
    name = "edm_v"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 700.0, table_size: int = 1000):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        log_range = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), table_size,
                                   dtype=torch.float64)
        self.sigmas = log_range.exp()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        return 0.25 * torch.as_tensor(sigma, dtype=torch.float64).log()

    def t_to_sigma(self, t) -> torch.Tensor:
        return (4.0 * torch.as_tensor(t, dtype=torch.float64)).exp()

    noise_scaling = Discrete.noise_scaling  # x0 + sigma n, and its inverse
    inverse = Discrete.inverse
    to_x0 = V.to_x0  # c_skip x + c_out v

    def network_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in x, c_noise) for sigma of shape (B,)."""
        s = per_item(sigma, x)
        return x * (s**2 + 1).rsqrt(), self.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)


def prediction_for(family, latent_size: tuple[int, int] = (64, 64)) -> Prediction:
    """The prediction object of a family record. ``latent_size`` (height, width) matters only to flow
    models whose shift depends on the resolution (FLUX dev)."""
    s = family.schedule
    if family.prediction == "edm_v":
        return EDMV(s.sigma_min, s.sigma_max)
    if family.prediction == "flow":
        return Flow(shift=s.shift_for(*latent_size), multiplier=s.multiplier)
    betas = schedules.betas_for(s.kind, s.beta_start, s.beta_end, s.num_steps)
    if family.prediction == "eps":
        return Eps(betas=betas)
    if family.prediction == "v":
        return V(betas=betas)
    raise ValueError(f"unknown prediction type {family.prediction!r} in family {family.name}")
