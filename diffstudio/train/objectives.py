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
    from diffstudio.sampling import schedules

    s = family.schedule
    betas = schedules.betas_for(s.kind, s.beta_start, s.beta_end, s.num_steps)
    return torch.cumprod(1.0 - betas.double(), dim=0).float()


def diffusion_loss(family, net, x0: torch.Tensor, cond: dict, gen: torch.Generator,
                   acp: torch.Tensor | None = None, flow_t_scale: float = 1000.0,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Mean-squared error of the network's prediction at a random noise level.

    ``snr_gamma``: Min-SNR-gamma weighting (Hang et al. 2023, eq. 9) for eps and v. Written as an x0 error,
    the eps loss weighs each noise level by SNR(t) and the v loss by SNR(t) + 1, so the nearly clean
    steps dominate the gradient (SNR up to ~1e3 with SD's schedule) while the mid-noise steps, where
    colour and shape are decided from the text, barely count. Min-SNR caps the x0 weight at gamma: each
    sample's loss is scaled by min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v).
    """
    if snr_gamma is not None and family.prediction == "flow":
        raise ValueError("snr_gamma (Min-SNR weighting) is defined for eps and v prediction, not flow matching")
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    if family.prediction == "flow":
        s = torch.sigmoid(torch.randn(b, generator=gen)).to(x0)
        sv = s.view(b, *([1] * (x0.ndim - 1)))
        out = net((1 - sv) * x0 + sv * noise, s * flow_t_scale, **cond)
        return F.mse_loss(out.float(), (noise - x0).float())
    acp = alphas_cumprod(family) if acp is None else acp
    t = torch.randint(0, len(acp), (b,), generator=gen)
    a = acp[t].sqrt().to(x0).view(b, *([1] * (x0.ndim - 1)))
    s = (1 - acp[t]).sqrt().to(x0).view_as(a)
    out = net(a * x0 + s * noise, t.float().to(x0.device), **cond)
    target = noise if family.prediction == "eps" else a * noise - s * x0
    if snr_gamma is None:
        return F.mse_loss(out.float(), target.float())
    snr = acp[t] / (1 - acp[t])
    weight = snr.clamp(max=snr_gamma) / (snr if family.prediction == "eps" else snr + 1)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()


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
    # recipe without edge weight (the demo file shipped until session 7) still trains bit for bit as it did
    loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl
    if chroma_weight:
        loss = loss + chroma_weight * F.l1_loss(chroma(recon), chroma(images))
    return loss
