"""Sampling: schedules, prediction types (denoisers), pure samplers and seeded noise.

k-diffusion's contract (docs/sampling.md): a denoiser ``D(x, sigma, **cond) -> x0`` with a
``.kind``; samplers ``sample_<name>(denoiser, x, sigmas, *, extra, callback, noise)`` over a
decreasing sigma schedule that ends in 0.
"""

from __future__ import annotations

from diffstudio.sampling.denoisers import DiscreteEps, DiscreteV, Flow
from diffstudio.sampling.noise import SeededNoise
from diffstudio.sampling.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)
from diffstudio.sampling.schedules import (
    SCHEDULERS,
    flow_sigmas,
    flux_mu,
    get_sigmas,
    sigmas_for_strength,
    split_sigmas,
    validate_sigmas,
)

__all__ = [
    "SAMPLERS", "SCHEDULERS", "DiscreteEps", "DiscreteV", "Flow", "SeededNoise", "flow_sigmas", "flux_mu",
    "get_sampler", "get_sigmas", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler",
    "sample_euler_ancestral", "sample_heun", "sample_lcm", "sigmas_for_strength", "split_sigmas",
    "validate_sigmas",
]
