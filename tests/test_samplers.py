"""Samplers checked against closed forms, with no training at all.

For Gaussian data x0 ~ N(μ_y, s² I) the exact noise predictor is
E[ε | x_t, y] = sqrt(1-ᾱ_t) (x_t - sqrt(ᾱ_t) μ_y) / (ᾱ_t s² + 1 - ᾱ_t),
so any correct sampler driven by it must return samples with mean μ_y and variance s².
"""

import math

import pytest
import torch

from diffcli import guidance, image_samplers, samplers
from diffcli.schedules import make_schedule
from diffcli.spec import SamplerSpec

MU = torch.tensor([[1.5, -0.5], [-1.0, 1.0]])  # per class, 2 dims
S = 0.5
N = 4000


def eps_oracle(schedule, mu=MU, s=S):
    """The exact ε-predicting "network" for per-class Gaussian data."""
    def network(x, t, y):
        abar = schedule.alphas_cumprod[t].reshape(-1, 1)
        m = mu[y]
        return (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * s**2 + 1 - abar)
    return network


def oracle(schedule, mu=MU, s=S):
    return samplers.predictions(eps_oracle(schedule, mu, s), schedule, "eps")


def batch_randn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g)


def check_moments(x, label, what, discretisation=0.01):
    """Mean within 5 standard errors; variance within 5 standard errors plus an
    allowance for the sampler's discretisation error."""
    mean_tol = 5 * S / math.sqrt(N)
    var_tol = 5 * S**2 * math.sqrt(2 / N) + discretisation
    assert torch.allclose(x.mean(0), MU[label], atol=mean_tol), f"{what}: mean {x.mean(0).tolist()} vs {MU[label].tolist()}"
    assert torch.allclose(x.var(0), torch.full((2,), S**2), atol=var_tol), f"{what}: variance {x.var(0).tolist()} vs {S**2}"


@pytest.mark.parametrize("name", ["linear", "cosine"])
# DDIM with 10 steps shrinks the variance (0.13-0.18 instead of 0.25 here): its last step
# returns E[x0 | x_99], whose variance is below the data's. That is the sampler, not a bug,
# so it gets a wide variance allowance; 50 steps and more must be within 0.01.
@pytest.mark.parametrize("sampler,steps,discretisation", [
    ("ddpm", None, 0.01), ("ddim", 10, 0.13), ("ddim", 50, 0.01), ("ddim", 250, 0.01), ("dpm++", 20, 0.01),
    ("heun", 25, 0.01), ("heun-karras", 25, 0.01), ("ddim-karras", 50, 0.01)])
def test_samplers_recover_gaussian_data(name, sampler, steps, discretisation):
    schedule = make_schedule(name, 1000)
    randn = batch_randn(0)
    label = 1
    noise = randn(torch.empty(N, 2))
    y = torch.full((N,), label)
    sampler, _, spacing = sampler.partition("-")
    spec = SamplerSpec(sampler, steps, clip=False, spacing=spacing or "trailing")
    x = samplers.sample(spec, oracle(schedule), schedule, noise, y, randn)
    check_moments(x, label, f"{sampler} {steps or 'T'} steps {spacing}, {name}", discretisation)


def test_broken_oracle_is_caught():
    """The moment check above can fail: an oracle off by one timestep, or one that
    forgets the data variance, gives samples that fail it."""
    schedule = make_schedule("linear", 1000)
    good = eps_oracle(schedule)
    off_by_one = samplers.predictions(lambda x, t, y: good(x, (t + 20).clamp(max=999), y), schedule, "eps")

    wrong_var = oracle(schedule, s=1.0)
    for broken in (off_by_one, wrong_var):
        randn = batch_randn(0)
        x = samplers.ddim(broken, schedule, randn(torch.empty(N, 2)), torch.full((N,), 0), 50, clip_x0=False)
        with pytest.raises(AssertionError):
            check_moments(x, 0, "broken oracle")


def test_ddpm_with_uniform_noise_is_caught():
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    uniform = lambda x: (torch.rand(x.shape, generator=g) - 0.5) * 2  # wrong distribution, variance 1/3
    x = samplers.ddpm(oracle(schedule), schedule, torch.randn(N, 2, generator=g), torch.full((N,), 0), uniform, clip_x0=False)
    with pytest.raises(AssertionError):
        check_moments(x, 0, "uniform noise")


def test_ddim_eta0_is_deterministic():
    schedule = make_schedule("cosine", 1000)
    noise = torch.randn(16, 2)
    y = torch.zeros(16, dtype=torch.long)
    a = samplers.ddim(oracle(schedule), schedule, noise, y, 20)
    b = samplers.ddim(oracle(schedule), schedule, noise.clone(), y, 20)
    assert torch.equal(a, b)


def test_ddim_eta1_all_steps_is_ddpm_with_posterior_variance():
    """With all T steps and η = 1, eq. 16's σ_t² equals β̃_t, so DDIM and DDPM agree step by step
    when fed the same noise draws."""
    schedule = make_schedule("linear", 1000)
    noise = torch.randn(64, 2)
    y = torch.zeros(64, dtype=torch.long)
    a = samplers.ddim(oracle(schedule), schedule, noise, y, 1000, eta=1.0, randn_like=batch_randn(7), clip_x0=False)
    b = samplers.ddpm(oracle(schedule), schedule, noise, y, batch_randn(7), clip_x0=False)
    assert torch.allclose(a, b, atol=1e-4), f"max diff {(a - b).abs().max()}"
    # and the variance used is β̃ (not β): DDPM with variance β must differ
    c = samplers.ddpm(oracle(schedule), schedule, noise, y, batch_randn(7), variance="beta", clip_x0=False)
    assert not torch.allclose(a, c, atol=1e-3)


def test_posterior_variance_closed_form():
    from diffcli.schedules import cosine_betas

    b = cosine_betas(1000)  # float64: the identity is exact, float32 would lose it to cancellation
    a = torch.cumprod(1 - b, 0)
    t = torch.arange(1, 1000)
    beta_tilde = b[t] * (1 - a[t - 1]) / (1 - a[t])
    sigma2 = (1 - a[t - 1]) / (1 - a[t]) * (1 - a[t] / a[t - 1])  # DDIM eq. 16, η = 1
    assert torch.allclose(beta_tilde, sigma2, rtol=1e-9)


def test_trailing_timesteps():
    assert samplers.timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    ts = samplers.timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and all(a > b for a, b in zip(ts, ts[1:]))
    assert samplers.timesteps(1000, 1000) == list(range(999, -1, -1))
    assert samplers.timesteps(512, 7)[0] == 511 and len(samplers.timesteps(512, 7)) == 7
    with pytest.raises(ValueError):
        samplers.timesteps(1000, 0)


def test_guidance_weight_one_is_the_conditional_model_and_others_follow_eq6():
    calls = []

    def model(x, t, y):
        calls.append(len(y))
        return x * 0 + y[:, None].float()  # "ε" = the label, so the mix is easy to check

    x, t, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 1])
    assert torch.equal(guidance.guided(model, 1.0, 5)(x, t, y), model(x, t, y))
    assert torch.equal(guidance.guided(model, 0.0, 5)(x, t, y), torch.full((3, 2), 5.0))
    calls.clear()
    out = guidance.guided(model, 3.0, 5)(x, t, y)
    assert calls == [6], "guidance should be one batched forward pass of 2B"
    assert torch.allclose(out, 5 + 3 * (y[:, None].float() - 5))


def test_guiding_the_v_output_equals_guiding_eps():
    """ε is affine in v for a fixed x_t, so guidance commutes with the conversion."""
    schedule = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 2, generator=g), torch.randint(0, 1000, (6,), generator=g), torch.tensor([0, 1] * 3)
    v_net = lambda x, t, y: torch.sin(x + y[:, None]) * (1 + t[:, None] / 1000)  # any function will do
    abar = schedule.alphas_cumprod[t].reshape(-1, 1)
    eps_of = lambda v: (1 - abar).sqrt() * x + abar.sqrt() * v
    w, null = 2.5, 1
    eps_guided, _ = samplers.predictions(guidance.guided(v_net, w, null), schedule, "v")(x, t, y)
    cond, uncond = eps_of(v_net(x, t, y)), eps_of(v_net(x, t, torch.full_like(y, null)))
    assert torch.allclose(eps_guided, uncond + w * (cond - uncond), atol=1e-5)


def test_v_prediction_gives_the_same_eps_and_x0():
    schedule = make_schedule("cosine", 1000)
    eps_model = eps_oracle(schedule)

    def v_model(x, t, y):
        abar = schedule.alphas_cumprod[t].reshape(-1, 1)
        eps = eps_model(x, t, y)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    x, t, y = torch.randn(8, 2), torch.randint(0, 990, (8,)), torch.zeros(8, dtype=torch.long)
    eps_v, x0_v = samplers.predictions(v_model, schedule, "v")(x, t, y)
    eps_e, x0_e = samplers.predictions(eps_model, schedule, "eps")(x, t, y)
    assert torch.allclose(eps_v, eps_e, atol=1e-4) and torch.allclose(x0_v, x0_e, atol=1e-3)


def test_per_image_noise_does_not_depend_on_batch():
    seeds = list(range(10, 42))
    full = samplers.PerImageNoise(seeds)(torch.empty(32, 1, 4, 4))
    alone = samplers.PerImageNoise([27])(torch.empty(1, 1, 4, 4))
    assert torch.equal(full[17], alone[0])
    assert not torch.equal(full[16], full[17])


# --- class-conditional sampling, inversion, and that each assertion can fail --------

MU3 = torch.tensor([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])  # three classes, 3 apart, s = 0.5


def class_accuracy(x, label, mu=MU3):
    nearest = torch.cdist(x, mu).argmin(1)
    return (nearest == label).float().mean().item()


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("ddim", 50), ("dpm++", 20), ("heun", 10)])
def test_class_conditional_samples_land_on_their_class(sampler, steps):
    schedule = make_schedule("cosine", 1000)
    denoise = oracle(schedule, mu=MU3)
    randn = batch_randn(3)
    for label in range(3):
        y = torch.full((1000,), label)
        x = samplers.sample(SamplerSpec(sampler, steps, clip=False), denoise, schedule, randn(torch.empty(1000, 2)), y, randn)
        acc = class_accuracy(x, label)
        assert acc >= 0.99, f"{sampler}: only {acc:.1%} of class-{label} samples are nearest to class {label}'s mean"


def test_class_accuracy_check_can_fail():
    """An oracle that ignores the label (always class 0's mean) fails the 99% check."""
    schedule = make_schedule("cosine", 1000)
    ignore_label = samplers.predictions(lambda x, t, y: eps_oracle(schedule, MU3)(x, t, torch.zeros_like(y)), schedule, "eps")
    x = samplers.ddim(ignore_label, schedule, torch.randn(500, 2), torch.full((500,), 1), 50, clip_x0=False)
    assert class_accuracy(x, 1) < 0.99


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_inversion_reconstructs_the_input(name):
    """Data -> noise by the ODE forward, then noise -> data by DDIM, with the exact oracle.
    Inversion takes ε̂ at the previous point, a first-order error, so the round trip must
    shrink like 1/steps: RMS < 3/steps (data scale 0.5). Measured: linear 0.025 at 100
    steps and 0.0028 at 1000; cosine 0.014 and 0.0015."""
    schedule = make_schedule(name, 1000)
    denoise = oracle(schedule)
    x0 = MU[0] + S * torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(256, dtype=torch.long)
    for steps in (100, 1000):
        noise = image_samplers.ddim_invert(denoise, schedule, x0, y, steps)
        assert abs(noise.std().item() - 1) < 0.1, "inversion should land on unit-variance noise"
        back = samplers.ddim(denoise, schedule, noise, y, steps, clip_x0=False)
        rms = (back - x0).pow(2).mean().sqrt().item()
        assert rms < 3 / steps, f"{name}, {steps} steps: inversion then sampling, RMS error {rms:.4f}"


def test_inversion_check_can_fail():
    """Inverting with an oracle that reads ᾱ 20 timesteps off, then sampling with the right
    one, misses the input by far more than the stated tolerance."""
    schedule = make_schedule("linear", 1000)
    good = eps_oracle(schedule)
    off = samplers.predictions(lambda x, t, y: good(x, (t + 20).clamp(max=999), y), schedule, "eps")
    x0 = MU[0] + S * torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(256, dtype=torch.long)
    back = samplers.ddim(oracle(schedule), schedule, image_samplers.ddim_invert(off, schedule, x0, y, 100), y, 100, clip_x0=False)
    assert (back - x0).pow(2).mean().sqrt().item() > 3 / 100


def test_determinism_check_can_fail():
    """The same noise gives different samples once the sampler draws noise (η = 1)."""
    schedule = make_schedule("cosine", 1000)
    noise, y = torch.randn(16, 2), torch.zeros(16, dtype=torch.long)
    a = samplers.ddim(oracle(schedule), schedule, noise, y, 20, eta=1.0, randn_like=batch_randn(1))
    b = samplers.ddim(oracle(schedule), schedule, noise, y, 20, eta=1.0, randn_like=batch_randn(2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_karras_timesteps_start_at_pure_noise_and_crowd_the_low_noise_end(name):
    schedule = make_schedule(name, 1000)
    ts = samplers.karras_timesteps(schedule, 25)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True)
    below_100 = sum(t < 100 for t in ts)
    assert below_100 >= 5 > sum(t < 100 for t in samplers.timesteps(1000, 25))  # trailing: 3 of 25 below t = 100
    abar = schedule.alphas_cumprod.double()
    sigma = ((1 - abar) / abar).sqrt()
    assert sigma[ts[1]] <= samplers.HEUN_SIGMA_MAX * 1.1  # the ramp starts at EDM's sigma_max, not the schedule's 2e4


def test_heun_spends_two_evaluations_a_step_but_euler_ones_at_the_ends():
    schedule = make_schedule("cosine", 1000)
    calls = []
    network = eps_oracle(schedule)
    denoise = samplers.predictions(lambda x, t, y: calls.append(1) or network(x, t, y), schedule, "eps")
    samplers.sample(SamplerSpec("heun", 10, clip=False), denoise, schedule, torch.randn(8, 2), torch.zeros(8, dtype=torch.long),
                    batch_randn(0))
    assert len(calls) == 2 * 10 - 2  # Euler from T-1 (sigma above 80) and into sigma = 0
