"""A loaded model -> its network call and its k-diffusion style denoiser ``D(x, sigma, **cond) -> x0``.

``network_fn`` is the one function that calls a family's network, for inference and for training: the
family record adapts the call (packing, ids, argument order), inputs are cast to the model's dtype and
device, the output comes back float32. ``make_denoiser`` pairs it with the family's prediction object
(sampling/prediction.py).
"""

from __future__ import annotations

import torch

from diffstudio.errors import NaNError

# Keyword arguments latent-stage modules pass down to network-stage modules (pipeline/modules.py): a tile's
# position (tiled diffusion), a window's frame indices (video). The network itself never receives them.
LOCATION_KEYS = ("tile", "frames")


def network_fn(models, *, check_finite: bool = True):
    """``call(x, t, *, c_concat=None, **cond) -> output`` of ``models``' denoiser network.

    ``c_concat`` (inpainting checkpoints' extra input channels) is concatenated to x. With
    ``check_finite`` a NaN/inf output raises ``NaNError`` instead of spreading through the sampler."""
    net = models.denoiser
    dtype = models.dtype
    device = models.device
    call_net = models.family.call_denoiser or (lambda net, x, t, cond: net(x, t, **cond))

    def call(x: torch.Tensor, t: torch.Tensor, *, c_concat: torch.Tensor | None = None, **cond) -> torch.Tensor:
        for key in LOCATION_KEYS:  # where a call sits in a larger latent: read by modules, not by networks
            cond.pop(key, None)
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        cond = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v) for k, v in cond.items()}
        out = call_net(net, x.to(device=device, dtype=dtype), t.to(device), cond).to(x.device, torch.float32)
        if check_finite and not torch.isfinite(out).all():
            raise NaNError(f"the {models.family.name} denoiser produced NaN/inf values in {dtype}; "
                           "try dtype=torch.bfloat16 or torch.float32")
        return out

    return call


def make_denoiser(models, latent_size: tuple[int, int] = (64, 64)):
    """``latent_size`` (height, width) matters only to flow models with a resolution-dependent shift."""
    from diffstudio.sampling.denoisers import Denoiser
    from diffstudio.sampling.prediction import prediction_for

    return Denoiser(network_fn(models), prediction_for(models.family, latent_size))
