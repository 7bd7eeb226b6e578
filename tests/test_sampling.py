"""diffstudio.sampling: schedules, denoisers, samplers and seeded noise.

References: closed forms (a Gaussian data distribution has an exact denoiser and an exact
probability-flow ODE solution) and diffusers' schedulers as an independent implementation of the
published update rules, run on the same training schedule and the same toy model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from diffstudio.sampling import (
    SAMPLERS,
    DiscreteEps,
    DiscreteV,
    Flow,
    SeededNoise,
    flow_sigmas,
    flux_mu,
    get_sampler,
    get_sigmas,
    sigmas_for_strength,
    split_sigmas,
    validate_sigmas,
)
from diffstudio.sampling import schedules as S
from diffstudio.sampling.samplers import ancestral_step

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TABLE = S.model_sigmas(S.betas_scaled_linear())
DETERMINISTIC = ["euler", "heun", "dpmpp_2m", "ddim"]
STOCHASTIC = ["euler_ancestral", "dpmpp_2m_sde", "lcm"]


def close(a, b, rtol=1e-5, atol=1e-6):
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def toy_eps_model(x_in: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """A fixed smooth 'network' that depends on both its input and the timestep."""
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    return 0.8 * torch.tanh(x_in) + 0.1 * torch.cos(t / 200.0) + 0.05 * x_in.roll(1, dims=-1)


def diffusers_loop(scheduler, x, model=toy_eps_model, step_kwargs=None, per_step=None):
    """The standard diffusers denoising loop; returns every intermediate sample."""
    states = []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = model(x_in, t.expand(x.shape[0]).float())
        kwargs = dict(step_kwargs or {})
        if per_step is not None:
            kwargs.update(per_step(i))
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        states.append(x)
    return states


def collect():
    states = []
    return states, lambda i, total, x, denoised: states.append(x)


# -- schedules ------------------------------------------------------------------------------------


def test_model_sigmas_match_diffusers_training_schedule():
    for kind, (b0, b1) in [("scaled_linear", (0.00085, 0.012)), ("linear", (0.0001, 0.02))]:
        ref = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=kind)
        acp = ref.alphas_cumprod.double()
        close(S.model_sigmas(S.betas_for(kind, b0, b1, 1000)), ((1 - acp) / acp).sqrt(), rtol=1e-5)


def test_sigma_t_conversions_interpolate_in_log_sigma():
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    close(S.t_to_sigma(t, TABLE), TABLE[[0, 10, 500, 999]], rtol=1e-12)
    close(S.sigma_to_t(TABLE[[0, 10, 500, 999]], TABLE), t, rtol=1e-9)
    geometric_mean = (TABLE[10] * TABLE[11]).sqrt()
    close(S.sigma_to_t(geometric_mean, TABLE), 10.5, rtol=1e-9)
    close(S.t_to_sigma(10.5, TABLE), geometric_mean, rtol=1e-9)
    close(S.sigma_to_t(torch.tensor([0.0, 1e3]), TABLE), [0.0, 999.0])  # clamped to the table


def test_normal_equals_diffusers_linspace_spacing():
    ref = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(10)  # timesteps 999, 888, ..., 0: integers, so both interpolations agree
    close(get_sigmas("normal", TABLE, 10), ref.sigmas, rtol=2e-5)


def test_karras_equals_eq5_and_diffusers():
    sig = get_sigmas("karras", TABLE, 7)
    assert sig[-1] == 0 and len(sig) == 8
    close(sig[0], TABLE[-1], rtol=1e-6)
    close(sig[-2], TABLE[0], rtol=1e-6)
    root = sig[:-1].double() ** (1 / 7)  # eq. 5: evenly spaced in sigma^(1/rho)
    close(root.diff(), torch.full((6,), float(root[1] - root[0])), rtol=1e-4)
    ref = EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    ref.set_timesteps(7)
    close(sig, ref.sigmas, rtol=2e-5)


def test_exponential_is_even_in_log_sigma():
    sig = get_sigmas("exponential", (0.1, 10.0), 5)
    close(sig[:-1].double().log(), torch.linspace(math.log(10.0), math.log(0.1), 5, dtype=torch.float64))
    assert sig[-1] == 0


def test_sgm_uniform_simple_and_ddim_uniform_timesteps():
    t = S.sigma_to_t(get_sigmas("sgm_uniform", TABLE, 10)[:-1].double(), TABLE)
    close(t, torch.linspace(999, 0, 11, dtype=torch.float64)[:-1], atol=2e-3)
    trailing = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    trailing.set_timesteps(10)
    assert (t - trailing.timesteps.double()).abs().max() <= 1.0  # within one timestep of "trailing"

    close(get_sigmas("simple", TABLE, 10)[:-1], TABLE[list(range(999, 0, -100))], rtol=1e-6)

    ddim = DDIMScheduler(**SD_CONFIG, steps_offset=1, timestep_spacing="leading")
    ddim.set_timesteps(10)
    sig = get_sigmas("ddim_uniform", TABLE, 10)
    close(sig[:-1], TABLE[ddim.timesteps], rtol=1e-6)
    assert sig[-1] == 0


def test_flow_schedules_match_sd3_and_flux_conventions():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8))
    close(flow_sigmas(8, shift=3.0), ref.sigmas, rtol=1e-6)
    # FLUX: mu linear in the token count, and exp(mu)/(exp(mu) + 1/t - 1) == SD3's shift with exp(mu)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    mu = flux_mu(1024)
    close(S.flux_time_shift(mu, t), math.exp(mu) / (math.exp(mu) + (1 / t - 1)), rtol=1e-12)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    close(flow_sigmas(6, mu=mu), dynamic.sigmas, rtol=1e-6)
    flow_model = Flow(toy_eps_model, shift=3.0)
    close(get_sigmas("flow", flow_model, 8), flow_sigmas(8, 3.0))
    close(flow_model.sigmas[[0, -1]], [3e-3 / (1 + 2e-3), 1.0], rtol=1e-9)


def test_unknown_names_and_bad_steps_are_clear_errors():
    with pytest.raises(ValueError, match="known schedulers: normal, karras"):
        get_sigmas("cosine_dreams", TABLE, 10)
    with pytest.raises(ValueError, match="known samplers: euler, euler_ancestral, heun"):
        get_sampler("euler_b")
    with pytest.raises(ValueError, match="positive integer"):
        get_sigmas("normal", TABLE, 0)
    with pytest.raises(ValueError, match="Flow denoiser"):
        get_sigmas("flow", TABLE, 4)
    with pytest.raises(ValueError, match="known"):
        S.betas_for("cosine", 0.1, 0.2, 10)
    assert set(SAMPLERS) == {"euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm"}


def test_validate_sigmas_rules():
    close(validate_sigmas([3.0, 1.0, 0.5]), [3.0, 1.0, 0.5, 0.0])  # a missing final 0 is appended
    close(validate_sigmas(torch.tensor([3.0, 0.0])), [3.0, 0.0])
    for bad in ([1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [1.0, -0.5], [[1.0, 0.0]], [], [0.0], [float("nan"), 0.0]):
        with pytest.raises(ValueError):
            validate_sigmas(bad)


def test_custom_sigmas_are_the_ones_the_denoiser_sees():
    seen = []

    def denoiser(x, sigma):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    sigmas = validate_sigmas([7.0, 3.0, 0.25])
    for name in SAMPLERS:
        seen.clear()
        get_sampler(name)(denoiser, torch.randn(1, 3), sigmas)
        expected = [7.0, 3.0, 3.0, 0.25, 0.25] if name == "heun" else [7.0, 3.0, 0.25]
        assert seen == pytest.approx(expected), name


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_strength_picks_the_diffusers_img2img_start(steps, strength):
    ref = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    init = min(int(steps * strength), steps)  # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
    start = steps - init
    tail = sigmas_for_strength(get_sigmas("normal", TABLE, steps), strength)
    assert len(tail) == init + 1
    close(tail[0], ref.sigmas[start], rtol=2e-5)
    assert tail[-1] == 0


def test_strength_edges_and_split():
    sig = get_sigmas("karras", TABLE, 10)
    assert sigmas_for_strength(sig, 0.0).tolist() == [0.0]
    assert torch.equal(sigmas_for_strength(sig, 1.0), sig)
    with pytest.raises(ValueError):
        sigmas_for_strength(sig, 1.5)
    high, low = split_sigmas(sig, 4)
    assert len(high) == 5 and high[-1] == low[0] and torch.equal(torch.cat([high, low[1:]]), sig)


# -- denoisers ------------------------------------------------------------------------------------


def test_discrete_eps_and_v_recover_x0_with_diffusers_noising():
    ref = DDIMScheduler(**SD_CONFIG)
    x0, n = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([10, 400, 999])
    x_vp = ref.add_noise(x0, n, t)  # sqrt(abar) x0 + sqrt(1 - abar) n
    v = ref.get_velocity(x0, n, t)  # sqrt(abar) n - sqrt(1 - abar) x0
    sigma = TABLE[t].float()
    seen = {}

    def model_for(output):
        def model(x_in, t_in):
            seen["x_in"], seen["t"] = x_in, t_in
            return output
        return model

    eps_den = DiscreteEps(model_for(n), TABLE)
    x = eps_den.noise_scaling(sigma, n, x0)
    close(eps_den(x, sigma), x0, atol=1e-5)
    close(seen["x_in"], x_vp, atol=1e-5)  # the network sees exactly diffusers' noised sample ...
    close(seen["t"], t.float(), atol=1e-3)  # ... at its training timestep
    close(DiscreteV(model_for(v), TABLE)(x, sigma), x0, atol=1e-5)
    close(eps_den.inverse(sigma, x, x0), n, atol=1e-5)


def test_flow_denoiser_recovers_x0_and_passes_scaled_time():
    x0, n = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    s = torch.tensor([0.9, 0.2])
    seen = {}

    def model(x_in, t):
        seen["x"], seen["t"] = x_in, t
        return n - x0  # rectified-flow velocity

    for multiplier in (1000.0, 1.0):
        den = Flow(model, shift=3.0, multiplier=multiplier)
        x = den.noise_scaling(s, n, x0)
        close(x, (1 - s.view(2, 1, 1)) * x0 + s.view(2, 1, 1) * n)
        close(den(x, s), x0, atol=1e-6)
        close(seen["t"], s * multiplier)
        assert torch.equal(seen["x"], x)
        close(den.inverse(s, x, x0), n, atol=1e-5)
    assert den.kind == "flow" and den.sigma_max == 1.0 and DiscreteEps(model).kind == "ve"


# -- samplers: closed forms -----------------------------------------------------------------------


class Oracle:
    """A denoiser that knows x0."""

    def __init__(self, x0, kind):
        self.x0, self.kind = x0, kind

    def __call__(self, x, sigma):
        return self.x0.clone()


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_an_exact_denoiser_drives_every_sampler_to_x0(name, kind):
    x0 = torch.randn(2, 3, 4)
    noise = SeededNoise([1, 2], (3, 4))
    sigmas = get_sigmas("karras", TABLE, 6) if kind == "ve" else flow_sigmas(6, 3.0)
    x = Oracle(x0, kind)
    start = x.x0 + sigmas[0] * noise.initial() if kind == "ve" else noise.initial()
    out = get_sampler(name)(x, start, sigmas, noise=noise)
    close(out, x0, atol=1e-5)


class GaussianVE:
    """Data ~ N(mu, s0^2) per coordinate, x = x0 + sigma n.
    Exact denoiser D = (s0^2 x + sigma^2 mu) / (s0^2 + sigma^2)."""

    kind = "ve"

    def __init__(self, mu=0.7, s0=0.5):
        self.mu, self.s0 = mu, s0

    def __call__(self, x, sigma):
        s2 = sigma.view(-1, *([1] * (x.ndim - 1))).to(x) ** 2
        return (self.s0**2 * x + s2 * self.mu) / (self.s0**2 + s2)

    def on_ode(self, z, sigma):
        """The probability-flow ODE trajectory through mu + sqrt(s0^2 + sigma^2) z."""
        return self.mu + math.sqrt(self.s0**2 + sigma**2) * z


class GaussianFlow:
    """Same data, x = (1 - s) x0 + s n: D = mu + (1-s) s0^2 (x - (1-s) mu) / ((1-s)^2 s0^2 + s^2)."""

    kind = "flow"

    def __init__(self, mu=0.7, s0=0.5):
        self.mu, self.s0 = mu, s0

    def __call__(self, x, sigma):
        s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x)
        return self.mu + (1 - s) * self.s0**2 * (x - (1 - s) * self.mu) / ((1 - s) ** 2 * self.s0**2 + s**2)


def ode_error(name, steps, z, data=None):
    """Max error at sigma_min = 0.1 after integrating the PF-ODE from sigma_max = 10."""
    data = data or GaussianVE()
    sigmas = S.karras((0.1, 10.0), steps)[:-1].double()  # stop at sigma_min: no final jump to 0
    out = get_sampler(name)(data, data.on_ode(z, 10.0), sigmas)
    return float((out - data.on_ode(z, 0.1)).abs().max())


def test_ode_samplers_converge_with_their_order():
    z = torch.randn(32, 4, dtype=torch.float64)
    euler = [ode_error("euler", n, z) for n in (16, 32)]
    heun = [ode_error("heun", n, z) for n in (16, 32)]
    dpm = [ode_error("dpmpp_2m", n, z) for n in (16, 32, 64)]
    assert 1.8 < euler[0] / euler[1] < 2.2  # first order
    assert 3.5 < heun[0] / heun[1] < 4.8  # second order
    assert heun[1] < euler[1] / 10
    assert dpm[1] / dpm[2] > 3.5 and dpm[2] < euler[1] / 10
    close(get_sampler("ddim")(GaussianVE(), 7.0 * z, S.karras((0.1, 10.0), 16)[:-1].double()),
          get_sampler("euler")(GaussianVE(), 7.0 * z, S.karras((0.1, 10.0), 16)[:-1].double()), rtol=1e-12)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_land_on_the_ode_solution(name):
    """From x_T = mu + sqrt(s0^2 + sigma_max^2) z the PF-ODE ends at mu + s0 z."""
    z = torch.randn(32, 4, dtype=torch.float64)
    data = GaussianVE()
    errors = []
    for steps in (10, 40):
        sigmas = S.karras((0.002, 80.0), steps).double()
        out = get_sampler(name)(data, data.on_ode(z, 80.0), sigmas)
        errors.append(float((out - data.on_ode(z, 0)).abs().max()))
    assert errors[1] < errors[0] / 3 and errors[1] < 0.15  # 4x the steps: >= 4x smaller for order >= 1

    flow = GaussianFlow()
    errors = []
    for steps in (16, 256):
        out = get_sampler(name)(flow, z.clone(), flow_sigmas(steps, 3.0).double())  # x at s = 1 is pure noise
        errors.append(float((out - (flow.mu + flow.s0 * z)).abs().max()))
    assert errors[1] < errors[0] / 10 and errors[1] < 0.03


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("name,options", [("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5}),
                                          ("dpmpp_2m_sde", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_reproduce_the_data_distribution(name, options, kind):
    """Ancestral Euler's variance is biased low by O(1/steps) (0.43 instead of 0.5 at 40 steps,
    0.486 at 256), so many cheap steps; the statistical error of the std is 0.5 / sqrt(2n) = 0.0025."""
    n, steps = 20000, 256
    noise = SeededNoise([3], (n,), dtype=torch.float64)
    if kind == "ve":
        data, sigmas = GaussianVE(), S.karras((0.002, 80.0), steps).double()
        x = 80.0 * noise.initial()  # x_T ~ N(0, sigma_max^2): the mean and s0 are negligible against it
        x = x + data.mu
    else:
        data, sigmas = GaussianFlow(), flow_sigmas(steps, 3.0).double()
        x = noise.initial()
    out = get_sampler(name)(data, x.reshape(n, 1), sigmas, noise=lambda: noise().reshape(n, 1), **options)
    assert float(out.mean()) == pytest.approx(data.mu, abs=0.02)
    assert float(out.std()) == pytest.approx(data.s0, abs=0.02)


def test_flow_ancestral_step_keeps_the_flow_marginal():
    """scale * x_down + std * z has signal (1 - s_next) and total noise s_next (see ancestral_step)."""
    for s, s_next, eta in [(1.0, 0.8, 1.0), (0.7, 0.4, 1.0), (0.7, 0.4, 0.5), (0.3, 0.05, 1.0)]:
        s_down, scale, std = ancestral_step("flow", s, s_next, eta)
        assert 0 <= s_down <= s_next
        assert scale * (1 - s_down) == pytest.approx(1 - s_next)
        assert math.hypot(scale * s_down, std) == pytest.approx(s_next)
    assert ancestral_step("flow", 0.5, 0.3, 0.0) == (0.3, 1.0, 0.0)
    down, scale, up = ancestral_step("ve", 5.0, 2.0)
    assert scale == 1.0 and math.hypot(down, up) == pytest.approx(2.0)
    assert up == pytest.approx(math.sqrt(2.0**2 * (5.0**2 - 2.0**2) / 5.0**2))  # k-diffusion / DDPM


# -- samplers: diffusers' schedulers as the reference ---------------------------------------------


def run_ours(name, sigmas, x_ve, noise=None, **options):
    states, callback = collect()
    out = get_sampler(name)(DiscreteEps(toy_eps_model, TABLE), x_ve, sigmas, callback=callback,
                            noise=noise, **options)
    return out, states


def vp_to_ve(x_vp, sigma):
    return x_vp * math.sqrt(float(sigma) ** 2 + 1)


def test_euler_matches_diffusers_euler_discrete():
    ref = EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4) * ref.init_noise_sigma
    ours, states = run_ours("euler", get_sigmas("normal", TABLE, 10), x.clone())
    theirs = diffusers_loop(ref, x.clone())
    for a, b in zip(states, theirs):
        close(a, b, rtol=1e-4, atol=1e-4)


def test_euler_ancestral_matches_diffusers_with_the_same_noise():
    ref = EulerAncestralDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4) * ref.init_noise_sigma
    gen_ours, gen_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours, _ = run_ours("euler_ancestral", ref.sigmas, x.clone(),
                       noise=lambda: torch.randn(x.shape, generator=gen_ours))
    theirs = diffusers_loop(ref, x.clone(), step_kwargs={"generator": gen_ref})
    close(ours, theirs[-1], rtol=1e-4, atol=1e-4)


def test_heun_matches_diffusers_heun_discrete():
    ref = HeunDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4) * ref.init_noise_sigma
    ours, _ = run_ours("heun", get_sigmas("normal", TABLE, 10), x.clone())
    theirs = diffusers_loop(ref, x.clone())
    assert len(theirs) == 2 * 10 - 1  # 2n - 1 model calls, like ours
    close(ours, theirs[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_matches_diffusers_dpmsolver_multistep(sde):
    ref = DPMSolverMultistepScheduler(**SD_CONFIG, solver_order=2,
                                      algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    ref.set_timesteps(8)  # integer timesteps 999, 874, ...: exact table sigmas
    x_vp = torch.randn(2, 3, 4, 4)
    noises = [torch.randn(2, 3, 4, 4) for _ in range(8)]
    pending = list(noises)
    ours, states = run_ours("dpmpp_2m_sde" if sde else "dpmpp_2m", ref.sigmas, vp_to_ve(x_vp, ref.sigmas[0]),
                            noise=lambda: pending.pop(0))
    theirs = diffusers_loop(ref, x_vp.clone(),
                            per_step=lambda i: {"variance_noise": noises[i]} if sde else {})
    for a, b, sigma in zip(states, theirs, ref.sigmas[1:]):
        close(a, vp_to_ve(b, sigma), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim_and_equals_euler_when_deterministic(eta):
    ref = DDIMScheduler(**SD_CONFIG, steps_offset=1, set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(10)
    sigmas = get_sigmas("ddim_uniform", TABLE, 10)
    x_vp = torch.randn(2, 3, 4, 4)
    noises = [torch.randn(2, 3, 4, 4) for _ in range(10)]
    pending = list(noises)
    ours, states = run_ours("ddim", sigmas, vp_to_ve(x_vp, sigmas[0]), noise=lambda: pending.pop(0), eta=eta)
    theirs = diffusers_loop(ref, x_vp.clone(), step_kwargs={"eta": eta},
                            per_step=lambda i: {"variance_noise": noises[i]})
    for a, b, sigma in zip(states, theirs, sigmas[1:]):
        close(a, vp_to_ve(b, sigma), rtol=1e-4, atol=1e-4)
    if eta == 0.0:
        euler, _ = run_ours("euler", sigmas, vp_to_ve(x_vp, sigmas[0]))
        close(ours, euler, rtol=1e-5, atol=1e-5)


def test_lcm_matches_diffusers_lcm():
    ref = LCMScheduler(**SD_CONFIG)
    ref.set_timesteps(4)  # 999, 759, 499, 259 from the 50-step LCM grid
    sigmas = validate_sigmas(TABLE[ref.timesteps].float())
    x_vp = torch.randn(2, 3, 4, 4)
    gen_ours, gen_ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ours, states = run_ours("lcm", sigmas, vp_to_ve(x_vp, sigmas[0]),
                            noise=lambda: torch.randn(x_vp.shape, generator=gen_ours))
    theirs = diffusers_loop(ref, x_vp.clone(), step_kwargs={"generator": gen_ref})
    # diffusers' consistency boundary scalings (c_skip ~ 1e-8 at these timesteps) are the only difference
    for a, b, sigma in zip(states, theirs, sigmas[1:]):
        close(a, vp_to_ve(b, sigma), rtol=1e-4, atol=1e-4)


def toy_velocity_model(x, t, **cond):
    return toy_eps_model(x, t) - 0.3 * x


def test_flow_euler_matches_diffusers_flow_match_euler_shift_3():
    steps = 8
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    x = torch.randn(2, 3, 4, 4)
    states, callback = collect()
    get_sampler("euler")(Flow(toy_velocity_model, shift=3.0), x.clone(), flow_sigmas(steps, 3.0),
                         callback=callback)
    theirs = diffusers_loop(ref, x.clone(), model=toy_velocity_model)
    for a, b in zip(states, theirs):
        close(a, b, rtol=1e-4, atol=1e-4)


def test_flow_dpmpp_2m_matches_diffusers_flow_sigmas():
    """diffusers truncates this scheduler's timesteps to integers (999, 954, ...) while the sigmas stay
    exact, so the toy model here ignores t: the update rule is what is compared."""

    def velocity(x, t, **cond):
        return toy_velocity_model(x, torch.zeros_like(t))

    ref = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", use_flow_sigmas=True,
                                      prediction_type="flow_prediction", flow_shift=3.0)
    ref.set_timesteps(8)
    x = torch.randn(2, 3, 4, 4)
    states, callback = collect()
    get_sampler("dpmpp_2m")(Flow(velocity, shift=3.0), x.clone(), ref.sigmas, callback=callback)
    theirs = diffusers_loop(ref, x.clone(), model=velocity)
    for a, b in zip(states, theirs):
        close(a, b, rtol=1e-4, atol=1e-4)


# -- seeded noise ---------------------------------------------------------------------------------


def test_seeded_noise_is_per_item_and_repeatable():
    batch = SeededNoise([11, 12, 13], (2, 3))
    alone = SeededNoise([12], (2, 3))
    again = SeededNoise.from_seed(11, 3, (2, 3))
    first, second = batch.initial(), batch()
    assert first.shape == (3, 2, 3) and not torch.equal(first, second)
    assert torch.equal(first[1:2], alone.initial()) and torch.equal(second[1:2], alone())
    assert torch.equal(first, again.initial())
    assert torch.equal(first[0], torch.randn(2, 3, generator=torch.Generator().manual_seed(11)))
    half = SeededNoise([11], (2, 3), dtype=torch.float16)
    assert half.initial().dtype == torch.float16
    with pytest.raises(RuntimeError):
        half.initial()
    with pytest.raises(ValueError):
        SeededNoise([], (2,))


def test_batch_item_equals_its_seed_run_alone_through_an_ancestral_sampler():
    sigmas = get_sigmas("karras", TABLE, 6)
    den = DiscreteEps(toy_eps_model, TABLE)

    def run(seeds):
        noise = SeededNoise(seeds, (3, 4, 4))
        return get_sampler("euler_ancestral")(den, noise.initial() * sigmas[0], sigmas, noise=noise)

    batch = run([40, 41])
    close(batch[1:], run([41]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
