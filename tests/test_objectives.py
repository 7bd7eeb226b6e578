"""Training objectives: Min-SNR-gamma weighting against diffusers' reference (training_utils.compute_snr)."""

from __future__ import annotations

import pytest
import torch

from diffstudio.families.sd15 import SD15
from diffstudio.train.objectives import alphas_cumprod, diffusion_loss


class FixedOutput:
    """A 'network' whose output does not depend on its input, recording the timesteps it was called with."""

    def __init__(self, out: torch.Tensor):
        self.out, self.t = out, None

    def __call__(self, x, t):
        self.t = t.long()
        return self.out


def _reference_loss(prediction: str, x0, out, seed: int, gamma: float) -> torch.Tensor:
    """The weighting of diffusers' text-to-image training script, from diffusers' own scheduler and SNR."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, prediction_type=prediction)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)  # diffusion_loss draws the noise first, then t
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    target = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
    snr = compute_snr(sched, t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction == "epsilon" else weights / (snr + 1)
    per_sample = (out - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_matches_diffusers(prediction):
    from dataclasses import replace

    family = replace(SD15, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, out = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    ours = diffusion_loss(family, FixedOutput(out), x0, {}, torch.Generator().manual_seed(5), snr_gamma=5.0)
    ref = _reference_loss("epsilon" if prediction == "eps" else "v_prediction", x0, out, 5, 5.0)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    plain = diffusion_loss(family, FixedOutput(out), x0, {}, torch.Generator().manual_seed(5))
    assert abs(ours.item() - plain.item()) > 0.05 * plain.item()  # the weighting changed the loss


def test_min_snr_caps_only_the_clean_steps():
    """A gamma above every step's SNR leaves the eps loss unchanged; gamma = 1 scales each sample by
    min(SNR, 1) / SNR, so a very noisy step keeps its weight and a nearly clean one loses most of it."""
    acp = alphas_cumprod(SD15)
    g = torch.Generator().manual_seed(1)
    x0, out = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
    max_snr = (acp / (1 - acp)).max().item()
    plain = diffusion_loss(SD15, FixedOutput(out), x0, {}, torch.Generator().manual_seed(2))
    capped_above = diffusion_loss(SD15, FixedOutput(out), x0, {}, torch.Generator().manual_seed(2),
                                  snr_gamma=max_snr * 1.01)
    torch.testing.assert_close(capped_above, plain)
    net = FixedOutput(torch.zeros(1, 4, 8, 8))
    x0 = torch.zeros(1, 4, 8, 8)
    for seed in range(40):  # the per-sample loss is |noise|^2 (target eps, output 0); read the weight off it
        diffusion_loss(SD15, net, x0, {}, torch.Generator().manual_seed(seed))
        t = net.t.item()
        weighted = diffusion_loss(SD15, net, x0, {}, torch.Generator().manual_seed(seed), snr_gamma=1.0)
        unweighted = diffusion_loss(SD15, net, x0, {}, torch.Generator().manual_seed(seed))
        snr = (acp[t] / (1 - acp[t])).item()
        assert weighted.item() == pytest.approx(unweighted.item() * min(snr, 1.0) / snr, rel=1e-4)


def test_min_snr_is_refused_for_flow_matching():
    from diffstudio.families.sd3 import SD3

    with pytest.raises(ValueError, match="flow"):
        diffusion_loss(SD3, FixedOutput(torch.zeros(1, 16, 8, 8)), torch.zeros(1, 16, 8, 8), {},
                       torch.Generator().manual_seed(0), snr_gamma=5.0)


class FixedReconstruction:
    """An 'autoencoder' with a fixed output and a zero-mean, near-deterministic posterior."""

    def __init__(self, recon: torch.Tensor):
        self.recon = recon

    def encode_dist(self, images):
        z = torch.zeros(images.shape[0], 4, 2, 2)
        return z, torch.full_like(z, -30.0)

    def decode(self, z):
        return self.recon


def _square_image() -> torch.Tensor:
    image = -torch.ones(1, 3, 16, 16)  # black, a white 6x6 square at rows/cols 5..10
    image[..., 5:11, 5:11] = 1.0
    return image


def test_edge_map_marks_a_band_around_the_boundary_only():
    from diffstudio.train.objectives import edge_map

    edges = edge_map(_square_image())[0, 0]
    assert edges[5, 5] == 1 and edges[4, 7] == 1 and edges[10, 10] == 1  # on and beside the outline
    assert edges[7:9, 7:9].sum() == 0  # the square's inside
    assert edges[0, 0] == 0 and edges[15, 15] == 0  # the background far away


@pytest.mark.parametrize("chroma_weight", [0.0, 4.0])
def test_the_edge_weight_multiplies_the_error_along_edges_only(chroma_weight):
    from diffstudio.train.objectives import vae_loss

    image, gen = _square_image(), torch.Generator()
    base = vae_loss(FixedReconstruction(image), image, gen, kl_weight=0.0)
    assert base.abs() < 1e-6
    at_edge, inside = image.clone(), image.clone()
    at_edge[0, 0, 5, 5] -= 0.5  # one channel of a corner pixel off by 0.5
    inside[0, 0, 7, 7] -= 0.5
    plain = [vae_loss(FixedReconstruction(r), image, gen, kl_weight=0.0, chroma_weight=chroma_weight)
             for r in (at_edge, inside)]
    weighted = [vae_loss(FixedReconstruction(r), image, gen, kl_weight=0.0, chroma_weight=chroma_weight,
                         edge_weight=7.0) for r in (at_edge, inside)]
    # L1 + L2 of the one off value (0.5 + 0.25), plus the chroma term's: that pixel's chroma moves by 1/3, 1/6, 1/6
    expected = (0.75 + chroma_weight * (1 / 3 + 1 / 6 + 1 / 6)) / image.numel()
    assert torch.allclose(torch.stack(plain), torch.tensor([expected, expected]), rtol=1e-5)
    assert torch.allclose(weighted[0], torch.tensor(8 * expected), rtol=1e-5)
    assert torch.allclose(weighted[1], torch.tensor(expected), rtol=1e-5)
