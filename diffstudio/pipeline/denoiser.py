"""A loaded model -> a k-diffusion style denoiser ``D(x, sigma, **cond) -> x0``.

The family record says the prediction type and training schedule; this module only
wires the denoiser network to the matching model-sampling object. The network runs in
the models' dtype, the sampler's state stays float32.
"""

from __future__ import annotations

import torch

from diffstudio.errors import NaNError


def network_fn(models):
    """The raw network call shared by every family: inputs cast in, outputs cast out."""
    net = models.denoiser
    dtype = models.dtype
    device = models.device
    call_net = models.family.call_denoiser or (lambda net, x, t, cond: net(x, t, **cond))

    def call(x: torch.Tensor, t: torch.Tensor, *, c_concat: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        cond = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v) for k, v in cond.items()}
        out = call_net(net, x.to(device=device, dtype=dtype), t.to(device), cond).to(x.device, torch.float32)
        if not torch.isfinite(out).all():
            raise NaNError(f"the {models.family.name} denoiser produced NaN/inf values in {dtype}; "
                           "try dtype=torch.bfloat16 or torch.float32")
        return out

    return call


def make_denoiser(models, latent_size: tuple[int, int] = (64, 64)):
    """``latent_size`` (height, width) matters only to flow models with a resolution-dependent shift."""
    from diffstudio.sampling import denoisers, schedules

    family = models.family
    fn = network_fn(models)
    s = family.schedule
    if family.prediction == "flow":
        return denoisers.Flow(fn, shift=s.shift_for(*latent_size), multiplier=s.multiplier)
    betas = schedules.betas_for(s.kind, s.beta_start, s.beta_end, s.num_steps)
    sigmas = schedules.model_sigmas(betas)
    if family.prediction == "eps":
        return denoisers.DiscreteEps(fn, sigmas)
    if family.prediction == "v":
        return denoisers.DiscreteV(fn, sigmas)
    raise ValueError(f"unknown prediction type {family.prediction!r} in family {family.name}")
