"""Samplers: pure functions over a sigma schedule (k-diffusion's contract).

    sample_<name>(denoiser, x, sigmas, *, extra=None, callback=None, noise=None, **options) -> x

* ``denoiser(x, sigma, **extra) -> x0``, sigma of shape (B,); its ``.kind`` ("ve" or "flow", see
  denoisers.py) says how noise enters x. A plain callable without ``.kind`` is taken as "ve".
* ``sigmas``: 1-D, decreasing; the last entry is normally 0 (a clean sample). A step to 0 returns
  the denoiser's x0 itself in every sampler.
* ``noise()``: fresh N(0, I) shaped like x (a noise.SeededNoise for reproducible runs); default
  ``torch.randn_like``. Only stochastic samplers call it, once per step that adds noise.
* ``callback(i, total, x, denoised)`` after step i: x is the new state, denoised the x0 estimate
  of that step.

Deterministic samplers integrate the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma,
which is the same formula for both kinds: in VE form it is Karras et al. 2022, eq. 3 with
s(t) = 1; in flow form x - D = s (n - x0), so (x - D) / s is the velocity v (Liu et al. 2022).

Both kinds are an instance of x = alpha x0 + sigma_t n: VE has alpha = 1, sigma_t = sigma;
flow has alpha = 1 - s, sigma_t = s. Multistep and stochastic rules are written with this
(alpha, sigma_t) pair, lambda = log(alpha / sigma_t) the half log-SNR (Lu et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffstudio.errors import InvalidInputError

KINDS = ("ve", "flow")


# -- helpers ------------------------------------------------------------------------------------


def _kind(denoiser) -> str:
    kind = getattr(denoiser, "kind", "ve")
    if kind not in KINDS:
        raise ValueError(f"denoiser.kind must be one of {KINDS}, got {kind!r}")
    return kind


def _floats(sigmas) -> list[float]:
    if isinstance(sigmas, torch.Tensor):
        return [float(s) for s in sigmas.detach().cpu().reshape(-1)]
    return [float(s) for s in sigmas]


def _call(denoiser, x: torch.Tensor, sigma: float, extra: dict | None) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), **(extra or {}))


def _noise_fn(noise, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    if noise is not None:
        return lambda: noise().to(device=x.device, dtype=x.dtype)
    return lambda: torch.randn_like(x)


def _report(callback, i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, total, x, denoised)


def alpha_sigma(kind: str, sigma: float) -> tuple[float, float]:
    """(alpha, sigma_t) of x = alpha x0 + sigma_t n at noise level sigma, in the sampler's coordinates."""
    return (1.0, sigma) if kind == "ve" else (1.0 - sigma, sigma)


def _half_log_snr(kind: str, sigma: float) -> float:
    """lambda = log(alpha / sigma_t); -inf where alpha = 0 (flow at s = 1)."""
    alpha, sigma_t = alpha_sigma(kind, sigma)
    return -math.inf if alpha <= 0 else math.log(alpha / sigma_t)


def _ve_equivalent(kind: str, sigma: float) -> float:
    """Noise-to-signal ratio r = sigma_t / alpha: the VE sigma of the same point (x / alpha = x0 + r n)."""
    alpha, sigma_t = alpha_sigma(kind, sigma)
    return math.inf if alpha <= 0 else sigma_t / alpha


def _ode_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Euler step of the PF-ODE: x + (x - D) / sigma * (sigma_next - sigma), written so that
    sigma_next = 0 gives D exactly."""
    return denoised + (x - denoised) * (sigma_next / sigma)


def ancestral_step(kind: str, sigma: float, sigma_next: float,
                   eta: float = 1.0) -> tuple[float, float, float]:
    """An ancestral step sigma -> sigma_next as (sigma_down, scale, noise_std):
    x_next = scale * ODE-step(x, sigma -> sigma_down) + noise_std * z.

    In VE form this is k-diffusion's split (from DDPM's posterior, Ho et al. 2020, eq. 7):
    sigma_up = min(sigma_next, eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2), scale 1, noise_std sigma_up.

    Flow: divide x = (1 - s) x0 + s n by alpha = 1 - s and it is VE with r = s / (1 - s). Split r
    as above into r_down, r_up; go down the ODE to s_down = r_down / (1 + r_down), i.e.
    x_down = (1 - s_down)(x0 + r_down n'); then x_next = alpha_next (x_down / (1 - s_down) + r_up z).
    So scale = (1 - s_next) / (1 - s_down), noise_std = (1 - s_next) r_up, and x_next has
    signal (1 - s_next) x0 and noise std (1 - s_next) sqrt(r_down^2 + r_up^2) = s_next, as it must.
    eta = 1 is DDPM's ancestral sampling for both kinds; eta = 0 is the plain ODE step.
    """
    if sigma_next <= 0 or eta == 0:
        return sigma_next, 1.0, 0.0
    r, r_next = _ve_equivalent(kind, sigma), _ve_equivalent(kind, sigma_next)
    r_up = min(r_next, eta * r_next * math.sqrt(max(0.0, 1.0 - (r_next / r) ** 2)))
    r_down = math.sqrt(max(0.0, r_next**2 - r_up**2))
    if kind == "ve":
        return r_down, 1.0, r_up
    s_down = r_down / (1.0 + r_down)
    alpha_next = 1.0 - sigma_next
    return s_down, alpha_next / (1.0 - s_down), alpha_next * r_up


def _renoise(kind: str, sigma: float, x0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    alpha, sigma_t = alpha_sigma(kind, sigma)
    return alpha * x0 + sigma_t * n


# -- first order ---------------------------------------------------------------------------------


def sample_euler(denoiser, x, sigmas, *, extra=None, callback=None, noise=None):
    """Euler's method on the PF-ODE (Karras et al. 2022, alg. 2 without its 2nd-order correction)."""
    sig = _floats(sigmas)
    total = len(sig) - 1
    for i in range(total):
        denoised = _call(denoiser, x, sig[i], extra)
        x = _ode_step(x, denoised, sig[i], sig[i + 1])
        _report(callback, i, total, x, denoised)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, extra=None, callback=None, noise=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Euler ancestral: an ODE step down to sigma_down, then fresh noise back up to sigma_next
    (see ``ancestral_step`` for both kinds)."""
    kind, sig, draw = _kind(denoiser), _floats(sigmas), _noise_fn(noise, x)
    total = len(sig) - 1
    for i in range(total):
        denoised = _call(denoiser, x, sig[i], extra)
        sigma_down, scale, noise_std = ancestral_step(kind, sig[i], sig[i + 1], eta)
        x = _ode_step(x, denoised, sig[i], sigma_down)
        if noise_std > 0:
            x = scale * x + (noise_std * s_noise) * draw()
        _report(callback, i, total, x, denoised)
    return x


def sample_ddim(denoiser, x, sigmas, *, extra=None, callback=None, noise=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12), in the variance-preserving "alpha" form it is published in:

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_eta^2) eps + sigma_eta z,
        sigma_eta = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)      (eq. 16)

    VE states are carried to VP (x_vp = x / sqrt(sigma^2 + 1), abar = 1 / (sigma^2 + 1)) and back.
    Flow states are already of the form alpha x0 + sigma_t n with alpha = 1 - s, sigma_t = s; eq. 12
    holds for any such pair with sqrt(abar) -> alpha, sqrt(1 - abar) -> sigma_t, and eq. 16 becomes
    sigma_eta = eta sigma_t,prev sqrt(1 - (r_prev / r)^2), r = sigma_t / alpha (equal for VP).
    With eta = 0 this is exactly Euler in VE form: D + sigma_prev * eps = x + (sigma_prev - sigma) eps.
    """
    kind, sig, draw = _kind(denoiser), _floats(sigmas), _noise_fn(noise, x)
    total = len(sig) - 1

    def vp(sigma: float) -> tuple[float, float, float]:
        """(alpha, sigma_t, x_vp / x) at a noise level."""
        if kind == "ve":
            alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
            return alpha, sigma * alpha, alpha
        return 1.0 - sigma, sigma, 1.0

    for i in range(total):
        denoised = _call(denoiser, x, sig[i], extra)
        alpha, sigma_t, to_vp = vp(sig[i])
        alpha_prev, sigma_t_prev, to_vp_prev = vp(sig[i + 1])
        eps = (to_vp * x - alpha * denoised) / sigma_t
        r, r_prev = _ve_equivalent(kind, sig[i]), _ve_equivalent(kind, sig[i + 1])
        sigma_eta = eta * sigma_t_prev * math.sqrt(max(0.0, 1.0 - (r_prev / r) ** 2))
        x_vp = alpha_prev * denoised + math.sqrt(max(0.0, sigma_t_prev**2 - sigma_eta**2)) * eps
        if sigma_eta > 0:
            x_vp = x_vp + sigma_eta * draw()
        x = x_vp / to_vp_prev
        _report(callback, i, total, x, denoised)
    return x


def sample_lcm(denoiser, x, sigmas, *, extra=None, callback=None, noise=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, alg. 1; Song et al. 2023, alg. 1):
    predict x0, then re-noise it with fresh noise to the next sigma."""
    kind, sig, draw = _kind(denoiser), _floats(sigmas), _noise_fn(noise, x)
    total = len(sig) - 1
    for i in range(total):
        denoised = _call(denoiser, x, sig[i], extra)
        x = denoised if sig[i + 1] <= 0 else _renoise(kind, sig[i + 1], denoised, draw())
        _report(callback, i, total, x, denoised)
    return x


# -- second order --------------------------------------------------------------------------------


def sample_heun(denoiser, x, sigmas, *, extra=None, callback=None, noise=None):
    """Heun's method (Karras et al. 2022, alg. 2, deterministic: S_churn = 0). Each step takes an
    Euler step, then averages the slopes at both ends (trapezoidal rule); the step to sigma = 0 stays
    Euler (the slope is undefined there), so n steps cost 2n - 1 model calls."""
    sig = _floats(sigmas)
    total = len(sig) - 1
    for i in range(total):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, sigma, extra)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next <= 0:
            x = denoised
        else:
            denoised_next = _call(denoiser, x_euler, sigma_next, extra)
            slope_next = (x_euler - denoised_next) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        _report(callback, i, total, x, denoised)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, extra=None, callback=None, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", alg. 2), data-prediction multistep.

    With h = lambda_next - lambda and r = h_prev / h:
        D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}        (D' = D_i on the first step)
        x_next = (sigma_t,next / sigma_t) x + alpha_next (1 - e^{-h}) D'
    The step to sigma = 0 returns D_i (first order there, as in the paper's final step).
    """
    kind, sig = _kind(denoiser), _floats(sigmas)
    total = len(sig) - 1
    old_denoised, h_prev = None, None
    for i in range(total):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, sigma, extra)
        if sigma_next <= 0:
            x = denoised
        else:
            h = _half_log_snr(kind, sigma_next) - _half_log_snr(kind, sigma)
            used = denoised
            if old_denoised is not None:
                half_inv_r = h / (2 * h_prev)
                used = (1 + half_inv_r) * denoised - half_inv_r * old_denoised
            alpha_next, sigma_t_next = alpha_sigma(kind, sigma_next)
            x = (sigma_t_next / alpha_sigma(kind, sigma)[1]) * x + (alpha_next * -math.expm1(-h)) * used
            h_prev = h
        old_denoised = denoised
        _report(callback, i, total, x, denoised)
    return x


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra=None, callback=None, noise=None,
                        eta: float = 1.0, s_noise: float = 1.0):
    """SDE-DPM-Solver++(2M) with the midpoint correction (Lu et al. 2022, "DPM-Solver++", app. B):

        x_next = (sigma_t,next / sigma_t) e^{-eta h} x + alpha_next (1 - e^{-(1+eta) h}) D_i
                 + 1/(2r) alpha_next (1 - e^{-(1+eta) h}) (D_i - D_{i-1})
                 + sigma_t,next sqrt(1 - e^{-2 eta h}) z

    eta = 1 is the published SDE solver; eta = 0 is exactly DPM-Solver++(2M) (expand its D').
    """
    kind, sig, draw = _kind(denoiser), _floats(sigmas), _noise_fn(noise, x)
    total = len(sig) - 1
    old_denoised, h_prev = None, None
    for i in range(total):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, sigma, extra)
        if sigma_next <= 0:
            x = denoised
        else:
            h = _half_log_snr(kind, sigma_next) - _half_log_snr(kind, sigma)
            eta_h = eta * h
            alpha_next, sigma_t_next = alpha_sigma(kind, sigma_next)
            weight = alpha_next * -math.expm1(-h - eta_h)
            x = (sigma_t_next / alpha_sigma(kind, sigma)[1] * math.exp(-eta_h)) * x + weight * denoised
            if old_denoised is not None:
                x = x + (0.5 * weight * h / h_prev) * (denoised - old_denoised)
            if eta > 0:
                x = x + (sigma_t_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise) * draw()
            h_prev = h
        old_denoised = denoised
        _report(callback, i, total, x, denoised)
    return x


# -- registry ------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered under ``name`` (a key of SAMPLERS)."""
    if name not in SAMPLERS:
        raise InvalidInputError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
