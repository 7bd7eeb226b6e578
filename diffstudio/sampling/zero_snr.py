"""Zero-terminal-SNR discrete schedules and the samplers that run on them in variance-preserving form.

A schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed", arXiv:2305.08891, Algorithm 1) ends at abar_T = 0: the last training timestep is pure noise, its
VE sigma sqrt((1 - abar) / abar) is infinite, and the k-diffusion form x = x0 + sigma n (samplers.py) cannot hold
it. CogVideoX is trained on such a schedule (v-prediction, the paper's sec. 3 recommendation), so its samplers
here keep the VP sample x = alpha x0 + sigma n with alpha = sqrt(abar), sigma = sqrt(1 - abar), where abar = 0
is an ordinary number. The model is a v-predictor v(x, t) (Salimans & Ho 2022): x0 = alpha x - sigma v.

CogVideoX also shifts the SNR of its scaled-linear schedule before the rescale (``snr_shift_scale``, 3 for the
2B model, 1 = none for 5B): SNR' = SNR / s, i.e. abar' = abar / (s + (1 - s) abar) (the release's sampler).

Samplers: ``sample_ddim_v`` (deterministic DDIM, Song et al. 2021 eq. 12 with eta = 0) and
``sample_dpmpp_2m_v`` (DPM-Solver++(2M), Lu et al. 2022, algorithm 2), both over integer training timesteps
in decreasing order; after the last timestep the sample is taken to abar = 1 (the clean latent). ``stride``
selects the release's rule for the level a step goes to (``_next_abar``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffstudio.errors import InvalidInputError
from diffstudio.sampling.schedules import betas_scaled_linear


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Shift sqrt(abar) so its last entry is 0, and scale it so its first keeps its value (Algorithm 1)."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * (first / (first - last))) ** 2


def cogvideo_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000,
                            snr_shift_scale: float = 1.0, zero_terminal_snr: bool = True) -> torch.Tensor:
    """abar_t for t = 0 .. T-1 (float64): scaled-linear betas, SNR divided by ``snr_shift_scale``, then
    rescaled to zero terminal SNR."""
    abar = torch.cumprod(1.0 - betas_scaled_linear(beta_start, beta_end, num_steps), dim=0)
    abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
    return rescale_zero_terminal_snr(abar) if zero_terminal_snr else abar


def trailing_timesteps(steps: int, num_train: int = 1000) -> list[int]:
    """``steps`` integer timesteps counted down from T - 1 in strides of T / steps ("trailing" spacing, Lin et
    al. 2024 table 2): the first step is always the pure-noise timestep T - 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train:
        raise InvalidInputError(f"steps must be an integer in [1, {num_train}], got {steps!r}")
    stride = num_train / steps
    return [int(round(num_train - i * stride)) - 1 for i in range(steps)]


def timesteps_for_strength(timesteps: Sequence[int], strength: float) -> list[int]:
    """Video-to-video: the last floor(steps * strength) timesteps of a schedule (strength 1: all of them)."""
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError(f"strength must be in (0, 1], got {strength}")
    kept = min(len(timesteps), int(len(timesteps) * strength + 1e-6))
    if kept == 0:
        raise InvalidInputError(f"strength {strength} leaves no step of {len(timesteps)}: raise steps or strength")
    return list(timesteps[len(timesteps) - kept:])


def _alpha_sigma(abar: float) -> tuple[float, float]:
    return math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))


def _next_abar(abar: torch.Tensor, timesteps: Sequence[int], i: int, stride: int | None) -> float:
    """abar after step i: at the next timestep of the schedule, or 1 (clean) after the last one. With ``stride``
    (the release's rule, diffusers' CogVideoX schedulers): at t - stride, or 1 below 0. The two agree when the
    step count divides T (50 of 1000: stride 20); otherwise trailing timesteps are not evenly spaced and the
    release's rule is what it was tuned with."""
    if stride is not None:
        t = timesteps[i] - stride
        return float(abar[t]) if t >= 0 else 1.0
    return float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0


def noise_to(abar_t: float, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The VP sample at a training level: sqrt(abar) x0 + sqrt(1 - abar) n."""
    alpha, sigma = _alpha_sigma(abar_t)
    return alpha * x0 + sigma * noise


VModel = Callable[[torch.Tensor, int, int], torch.Tensor]  # (x, timestep, step index) -> v


def sample_ddim_v(model: VModel, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                  callback: Callable | None = None, stride: int | None = None) -> torch.Tensor:
    """Deterministic DDIM in VP form. At each timestep: x0 = alpha x - sigma v, eps = (x - alpha x0) / sigma,
    x' = alpha' x0 + sigma' eps; written as x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0, which
    holds at sigma = 1, alpha = 0 (the zero-SNR first step) without dividing by alpha."""
    for i, t in enumerate(timesteps):
        alpha, sigma = _alpha_sigma(float(abar[t]))
        alpha_next, sigma_next = _alpha_sigma(_next_abar(abar, timesteps, i, stride))
        v = model(x, t, i)
        x0 = alpha * x - sigma * v
        ratio = sigma_next / sigma
        x = ratio * x + (alpha_next - alpha * ratio) * x0
        if callback is not None:
            callback(i, len(timesteps), x, x0)
    return x


def sample_dpmpp_2m_v(model: VModel, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                      callback: Callable | None = None, stride: int | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) in VP form on data predictions x0 = alpha x - sigma v (Lu et al. 2022, alg. 2):
    with lambda = log(alpha / sigma) and h = lambda' - lambda,
        x' = (sigma'/sigma) x - alpha' (e^-h - 1) D,   D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,  r = h_prev / h.
    The first step (lambda = -inf at zero SNR, so h = inf and r = inf) is first order, x' = sigma' x + alpha' x0;
    the last step, to abar = 1, returns x0 itself (as every sampler of samplers.py)."""
    previous, h_previous = None, None
    for i, t in enumerate(timesteps):
        alpha, sigma = _alpha_sigma(float(abar[t]))
        abar_next = _next_abar(abar, timesteps, i, stride)
        v = model(x, t, i)
        x0 = alpha * x - sigma * v
        if abar_next >= 1.0:
            x = x0
        else:
            alpha_next, sigma_next = _alpha_sigma(abar_next)
            lam = -math.inf if alpha == 0 else math.log(alpha / sigma)
            h = math.log(alpha_next / sigma_next) - lam
            d = x0
            if previous is not None and math.isfinite(h_previous):
                r = h_previous / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            previous, h_previous = x0, h
        if callback is not None:
            callback(i, len(timesteps), x, x0)
    return x


SAMPLERS_V = {"ddim": sample_ddim_v, "dpmpp_2m": sample_dpmpp_2m_v}


def get_sampler_v(name: str):
    if name not in SAMPLERS_V:
        raise InvalidInputError(f"unknown sampler {name!r} for zero-terminal-SNR models; known: "
                                f"{', '.join(SAMPLERS_V)}")
    return SAMPLERS_V[name]
