"""Training objectives, one per prediction type, shared by every family.

eps / v (Ho et al. 2020; Salimans & Ho 2022): t ~ U{0..N-1}, x_t = sqrt(a_t) x0 + sqrt(1-a_t) n,
the network predicts n (eps) or v = sqrt(a_t) n - sqrt(1-a_t) x0.
flow (Lipman et al. 2023; Esser et al. 2024): s ~ logit-normal, x_s = (1-s) x0 + s n, the
network predicts v = n - x0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alphas_cumprod(family) -> torch.Tensor:
    """abar_t of a discrete family's training schedule (float32), as its prediction object holds it."""
    from diffstudio.sampling.prediction import prediction_for

    return prediction_for(family).alphas_cumprod


def diffusion_loss(family_or_prediction, net, x0: torch.Tensor, cond: dict, gen: torch.Generator,
                   snr_gamma: float | None = None, rows: slice | None = None) -> torch.Tensor:
    """Mean-squared error of the network's prediction at a random noise level.

    The noising, the network's timestep and the target come from the prediction object
    (sampling/prediction.py: ``training_levels``, ``training_input``, ``training_target``); a family record
    stands for its own. The noise is drawn first, then the levels.

    ``snr_gamma``: Min-SNR-gamma weighting (Hang et al. 2023, eq. 9) for eps and v. Written as an x0 error,
    the eps loss weighs each noise level by SNR(t) and the v loss by SNR(t) + 1, so the nearly clean
    steps dominate the gradient (SNR up to ~1e3 with SD's schedule) while the mid-noise steps, where
    colour and shape are decided from the text, barely count. Min-SNR caps the x0 weight at gamma: each
    sample's loss is scaled by min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v).

    ``rows``: the loss of these rows of the batch only (a data-parallel process's share,
    ``train.loop.data_parallel_rows``); the noise and the levels are drawn for the whole batch first, so each
    row sees what it would in one process.
    """
    pred = _prediction(family_or_prediction)
    if snr_gamma is not None and pred.kind == "flow":
        raise ValueError("snr_gamma (Min-SNR weighting) is defined for eps and v prediction, not flow matching")
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    levels = pred.training_levels(x0.shape[0], gen)
    if rows is not None:
        batch = x0.shape[0]
        x0, noise, levels = x0[rows], noise[rows], levels[rows]
        cond = {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
                for k, v in cond.items()}
    x_in, t = pred.training_input(x0, noise, levels)
    out = net(x_in, t, **cond)
    target = pred.training_target(x0, noise, levels)
    if snr_gamma is None:
        return F.mse_loss(out.float(), target.float())
    weight = pred.min_snr_weight(levels, snr_gamma)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()


def _prediction(family_or_prediction):
    from diffstudio.sampling.prediction import Prediction, prediction_for

    if isinstance(family_or_prediction, Prediction):
        return family_or_prediction
    return prediction_for(family_or_prediction)


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """1 where a pixel is within one pixel of an edge of ``images`` (B, C, H, W), else 0: (B, 1, H, W)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    edges = F.pad(dx, (0, 1, 0, 0)) + F.pad(dy, (0, 0, 0, 1)) > 0.1
    return F.max_pool2d(edges.float(), 3, stride=1, padding=1)


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator, kl_weight: float = 1e-6,
             chroma_weight: float = 0.0, edge_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction (L1 + L2) plus a small KL to N(0, 1), as in LDM's autoencoder (without the GAN).

    ``chroma_weight`` adds an L1 term on the colour part of each pixel (RGB minus its mean): small
    autoencoders learn luminance first and can settle on a colourless latent space without it.
    """
    mean, logvar = vae.encode_dist(images)
    logvar = logvar.clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean)
    recon = vae.decode(z)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    chroma = lambda x: x - x.mean(dim=1, keepdim=True)  # noqa: E731
    if edge_weight:
        # the same terms per pixel, those along the target's edges counted (1 + edge_weight) times: a small
        # shape is mostly edge, and its corners are what an L1/L2-trained decoder rounds off first
        error = (recon - images).abs() + (recon - images).pow(2)
        if chroma_weight:
            error = error + chroma_weight * (chroma(recon) - chroma(images)).abs()
        return (error * (1 + edge_weight * edge_map(images))).mean() + kl_weight * kl
    # unweighted: the same terms through F.l1_loss / F.mse_loss, summed in the order they always were, so that a
    # recipe without edge weight (vae_edge_weight=0) trains bit for bit as that code path always has
    loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl
    if chroma_weight:
        loss = loss + chroma_weight * F.l1_loss(chroma(recon), chroma(images))
    return loss
