"""Noise schedules: the discrete training schedule, and the sampling schedules built on it.

Conventions (k-diffusion's): a *sampling schedule* is a 1-D float32 CPU tensor of noise levels
sigma_0 > sigma_1 > ... > sigma_n = 0, one entry per step boundary (n steps, n + 1 entries).
``sigma`` is the variance-exploding noise level x = x0 + sigma * n for discrete (eps / v) models,
and the flow-matching time s in x = (1 - s) x0 + s n for flow models.

The *model sigmas* of a discrete model are its training schedule expressed as sigmas: one per
training timestep t = 0 .. T-1, ascending, sigma_t = sqrt((1 - abar_t) / abar_t)
(Ho et al. 2020, eq. 4 rewritten in VE form; Karras et al. 2022, table 1).

Every sampling schedule is ``f(model_sampling, steps, **options) -> sigmas`` where
``model_sampling`` is a denoiser (anything with a ``.sigmas`` table of model sigmas, see
denoisers.py) or the model-sigma table itself; ``karras`` and ``exponential`` also take a
``(sigma_min, sigma_max)`` pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffstudio.errors import InvalidInputError

# -- the discrete training schedule --------------------------------------------------------------


def betas_linear(beta_start: float = 0.0001, beta_end: float = 0.02, n: int = 1000) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020, sec. 4): beta_t evenly spaced."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def betas_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> torch.Tensor:
    """Latent diffusion's "scaled linear" schedule: sqrt(beta_t) evenly spaced (SD 1.x / SDXL)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": betas_linear,
    "scaled_linear": betas_scaled_linear,
}


def betas_for(kind: str, beta_start: float, beta_end: float, num_steps: int) -> torch.Tensor:
    """The betas of a family's training schedule by name ("linear" or "scaled_linear")."""
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(sorted(BETA_SCHEDULES))}")
    return BETA_SCHEDULES[kind](beta_start, beta_end, num_steps)


def model_sigmas(betas: torch.Tensor) -> torch.Tensor:
    """Training schedule as sigmas: sqrt((1 - abar) / abar), abar = cumprod(1 - beta). Ascending, float64."""
    alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: torch.Tensor | float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of a sigma: linear interpolation in log(sigma) between the
    two neighbouring model sigmas; sigmas outside the table clamp to t = 0 or T - 1."""
    log_table = model_sigmas.to(torch.float64).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-30).log()
    log_sigma = log_sigma.clamp(log_table[0], log_table[-1])
    # index of the upper neighbour: the first table entry >= log_sigma
    high = torch.searchsorted(log_table, log_sigma.reshape(-1)).reshape(log_sigma.shape)
    high = high.clamp(1, len(log_table) - 1)
    low = high - 1
    w = (log_sigma - log_table[low]) / (log_table[high] - log_table[low])
    return low.to(torch.float64) + w.clamp(0.0, 1.0)


def t_to_sigma(t: torch.Tensor | float, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at a (fractional) training timestep: the inverse of ``sigma_to_t``."""
    log_table = model_sigmas.to(torch.float64).log()
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(log_table) - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


# -- flow matching --------------------------------------------------------------------------------


def shift_sigmas(s: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): s' = shift * s / (1 + (shift - 1) * s)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def flux_time_shift(mu: float, t: torch.Tensor | float) -> torch.Tensor:
    """FLUX's resolution-dependent shift: exp(mu) / (exp(mu) + (1/t - 1)).

    Algebraically ``shift_sigmas(t, exp(mu))`` (divide SD3's form by t), which is how it is
    computed here, so t = 0 maps to 0 without dividing by zero.
    """
    return shift_sigmas(t, math.exp(mu))


def flux_mu(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's mu: linear in the number of image tokens, base_shift at base_seq, max_shift at max_seq."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + slope * (image_seq_len - base_seq)


def flow_model_sigmas(shift: float = 1.0, n: int = 1000) -> torch.Tensor:
    """A flow model's table of training sigmas, ascending: shift((t + 1) / n) for t = 0 .. n-1."""
    return shift_sigmas(torch.arange(1, n + 1, dtype=torch.float64) / n, shift)


def flow_sigmas(steps: int, shift: float = 1.0, *, mu: float | None = None) -> torch.Tensor:
    """Flow-matching schedule: s evenly spaced from 1 to 0 (steps + 1 entries), then shifted.

    ``mu`` (FLUX, see ``flux_mu``) overrides ``shift`` with exp(mu). This is the FLUX reference
    schedule, and diffusers' FlowMatchEulerDiscreteScheduler given sigmas linspace(1, 1/steps, steps).
    """
    _check_steps(steps)
    if mu is not None:
        shift = math.exp(mu)
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


# -- sampling schedules ----------------------------------------------------------------------------


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidInputError(f"steps must be a positive integer, got {steps!r}")


def _table(model_sampling) -> torch.Tensor:
    """The ascending model-sigma table of a denoiser, or the table itself."""
    if isinstance(model_sampling, torch.Tensor):
        table = model_sampling
    elif hasattr(model_sampling, "sigmas"):
        table = model_sampling.sigmas
    else:
        raise ValueError("this schedule needs the model's sigma table: pass a denoiser (DiscreteEps, "
                         "DiscreteV, Flow) or the tensor returned by model_sigmas()")
    table = torch.as_tensor(table, dtype=torch.float64)
    if table.ndim != 1 or len(table) < 2:
        raise ValueError(f"a model-sigma table is 1-D with at least 2 entries, "
                         f"got shape {tuple(table.shape)}")
    return table


def _range(model_sampling) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a denoiser, a model-sigma table, or a (min, max) pair."""
    if isinstance(model_sampling, (tuple, list)) and len(model_sampling) == 2:
        lo, hi = float(model_sampling[0]), float(model_sampling[1])
    elif hasattr(model_sampling, "sigma_min") and hasattr(model_sampling, "sigma_max"):
        lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    else:
        table = _table(model_sampling)
        lo, hi = float(table[0]), float(table[-1])
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)]).float()


def normal(model_sampling, steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from T-1 down to 0 (both included), as sigmas, then 0.

    Equals diffusers' ``timestep_spacing="linspace"`` (EulerDiscreteScheduler's default for SD)
    whenever the timesteps are integers (e.g. T = 1000, steps in {4, 10, 28, 38, ...});
    between table entries we interpolate in log sigma (k-diffusion, ComfyUI), diffusers in sigma.
    """
    _check_steps(steps)
    table = _table(model_sampling)
    t = torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, table))


def sgm_uniform(model_sampling, steps: int) -> torch.Tensor:
    """SGM's "uniform" discretization: ``steps + 1`` timesteps evenly spaced from T-1 to 0, the
    last one (t = 0) dropped, then 0. Within one timestep of diffusers' ``"trailing"`` spacing."""
    _check_steps(steps)
    table = _table(model_sampling)
    t = torch.linspace(len(table) - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(t_to_sigma(t, table))


def simple(model_sampling, steps: int) -> torch.Tensor:
    """Every (T / steps)-th model sigma counted down from the top: table[T-1 - floor(i T / steps)], then 0."""
    _check_steps(steps)
    table = _table(model_sampling)
    n = len(table)
    index = [n - 1 - math.floor(i * n / steps) for i in range(steps)]
    return _append_zero(table[index])


def ddim_uniform(model_sampling, steps: int) -> torch.Tensor:
    """DDIM's uniform timesteps (Song et al. 2021, sec. C.2): t = 1 + i * (T // steps), descending, then 0.

    Equals diffusers' DDIMScheduler with ``timestep_spacing="leading"``, ``steps_offset=1`` (SD's config).
    """
    _check_steps(steps)
    table = _table(model_sampling)
    n = len(table)
    if steps > n - 1:
        raise ValueError(f"ddim_uniform needs steps < {n} (the training timesteps), got {steps}")
    stride = n // steps
    index = [min(1 + i * stride, n - 1) for i in reversed(range(steps))]
    return _append_zero(table[index])


def karras(model_sampling, steps: int, *, rho: float = 7.0,
           sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, then 0:
    sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0 .. n-1.

    sigma_min / sigma_max default to the model's (its smallest and largest training sigma).
    """
    _check_steps(steps)
    lo, hi = _range(model_sampling)
    lo, hi = sigma_min if sigma_min is not None else lo, sigma_max if sigma_max is not None else hi
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho_max, inv_rho_min = hi ** (1 / rho), lo ** (1 / rho)
    return _append_zero((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho)


def exponential(model_sampling, steps: int, *,
                sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min (both included), then 0."""
    _check_steps(steps)
    lo, hi = _range(model_sampling)
    lo, hi = sigma_min if sigma_min is not None else lo, sigma_max if sigma_max is not None else hi
    return _append_zero(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp())


def flow(model_sampling, steps: int) -> torch.Tensor:
    """``flow_sigmas(steps, shift)`` with the shift of a Flow denoiser."""
    if not hasattr(model_sampling, "shift"):
        raise ValueError("the 'flow' schedule needs a Flow denoiser (it reads its .shift); "
                         "or call flow_sigmas(steps, shift) directly")
    return flow_sigmas(steps, float(model_sampling.shift))


SCHEDULERS: dict[str, Callable[..., torch.Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "flow": flow,
}


def get_sigmas(name: str, model_sampling, steps: int, **options) -> torch.Tensor:
    """The sampling schedule ``name`` (a key of SCHEDULERS) for this model, ``steps`` steps."""
    if name not in SCHEDULERS:
        raise InvalidInputError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](model_sampling, steps, **options)


# -- user sigmas, img2img, splitting -------------------------------------------------------------


def validate_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Check a user-given schedule and return it as a float32 CPU tensor.

    Rules: 1-D, finite, >= 0, strictly decreasing (a repeated sigma is a step of length 0, and
    breaks the multistep solvers). If the last sigma is not 0, a 0 is appended, so that sampling
    ends on a clean sample (to stop early on purpose, use ``split_sigmas`` on the result).
    """
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"sigmas must be a 1-D sequence of numbers: {err}") from err
    if s.ndim != 1 or len(s) == 0:
        raise InvalidInputError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise InvalidInputError(f"sigmas must be finite and >= 0, got {s.tolist()}")
    if len(s) > 1 and not (s[1:] < s[:-1]).all():
        raise InvalidInputError(f"sigmas must be strictly decreasing (highest noise first), got {s.tolist()}")
    if s[-1] > 0:
        s = torch.cat([s, s.new_zeros(1)])
    if len(s) < 2:
        raise InvalidInputError("sigmas give no step: pass at least one sigma > 0 "
                         "(a trailing 0 is added if missing)")
    return s.float()


def sigmas_for_strength(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """img2img: the tail of a full schedule. ``len(sigmas) - 1`` is the full step count; strength
    keeps its last floor(steps * strength) steps (diffusers' img2img, A1111's default), so the
    sampler starts at sigmas[steps - kept] and strength 1 is the whole schedule. Strength 0 (or a
    strength too small for one step) leaves only the final sigma: zero steps, the input unchanged.
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strength must be in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    kept = min(steps, math.floor(steps * strength + 1e-6))  # 1e-6: 0.3 * 10 is 3, not 2.9999999
    return sigmas[steps - kept:]


def split_sigmas(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a schedule after ``step`` steps: (sigmas[:step + 1], sigmas[step:]), sharing the sigma at
    the seam. For a hand-over between two models (SDXL base -> refiner) or a partial denoise."""
    if not 0 <= step < len(sigmas):
        raise ValueError(f"step must be in [0, {len(sigmas) - 1}], got {step}")
    return sigmas[: step + 1], sigmas[step:]
