"""Flow matching (flow.py) against closed forms, with no training: for Gaussian data
x0 ~ N(μ_y, S² I) on the path x_s = (1 - s) x0 + s ε the exact velocity is
v*(x, s) = (s - (1 - s) S²) / V_s (x - (1 - s) μ) - μ,  V_s = (1 - s)² S² + s²,
its loss is the conditional variance of ε - x0 given x_s, and the flow ODE carries noise
x1 to exactly μ + S x1. Each check is shown failing with its formula broken."""

import pytest
import torch

from diffcli import flow, samplers
from diffcli.objective import Objective

MU = torch.tensor([[1.5, -0.5], [-1.0, 1.0]])  # per class, 2 dims (as test_samplers.py)
S = 0.5
T = 1000


def exact_velocity(x, s, y, mu=MU, sd=S):
    s = s.reshape(-1, 1)
    m = mu[y]
    var = (1 - s) ** 2 * sd**2 + s**2
    return (s - (1 - s) * sd**2) / var * (x - (1 - s) * m) - m


def as_network(field):
    """The field as a network sees it: flow time in units of T (Objective.inputs)."""
    return lambda x, t, y: field(x, t / T, y)


def denoiser(network):
    """The samplers' (ε̂, x̂0) from a velocity network, through the flow objective."""
    objective = Objective.flow(T, "uniform")
    return samplers.predictions(objective.network(network), objective.schedule, objective.prediction)


def loss_minimum(s, sd=S):
    """E|v* - (ε - x0)|² per dimension: Var(ε - x0) - Cov(ε - x0, x_s)² / Var(x_s)."""
    return (1 + sd**2) - (s - (1 - s) * sd**2) ** 2 / ((1 - s) ** 2 * sd**2 + s**2)


@pytest.mark.parametrize("broken", [False, True])
def test_the_exact_field_has_the_closed_form_loss_and_a_broken_one_does_not(broken):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    y = torch.randint(0, 2, (n,), generator=g)
    x0 = MU[y] + S * torch.randn(n, 2, generator=g)
    eps = torch.randn(n, 2, generator=g)
    s = flow.training_times(n, "logit-normal", g)
    x_s = flow.path(x0, eps, s)
    v = exact_velocity(x_s, s, y, sd=S * (1.5 if broken else 1.0))  # broken: the field of wider data
    loss = (v - flow.velocity(x0, eps)).square().mean(1)
    expected = loss_minimum(s)
    gap = (loss.mean() - expected.mean()).abs().item()
    assert (gap > 0.01) if broken else (gap < 0.005), (loss.mean().item(), expected.mean().item())


def test_the_flow_schedule_is_the_gaussian_path_on_its_grid():
    sched = flow.schedule(T)
    s = flow.times(T)
    abar = sched.alphas_cumprod.double()
    # ᾱ and 1 - ᾱ are α² = (1 - s)² and σ² = s², rescaled to a unit total
    total = (1 - s) ** 2 + s**2
    assert torch.allclose(abar, (1 - s) ** 2 / total, atol=1e-6) and torch.allclose(1 - abar, s**2 / total, atol=1e-6)
    assert torch.allclose(torch.cumprod(1 - sched.betas.double(), 0), abar, atol=1e-5)
    assert abar[-1] == 0 and (abar[1:] < abar[:-1]).all()


def euler_in_flow_time(field, x1, y, steps):
    """The flow ODE dx/ds = v by Euler from s = 1 to 0 on the trailing grid, by hand."""
    grid = flow.times(T)
    ts = samplers.timesteps(T, steps)
    x = x1.clone()
    for i, t in enumerate(ts):
        s, s_next = grid[t].item(), (grid[ts[i + 1]].item() if i + 1 < len(ts) else 0.0)
        x = x + (s_next - s) * field(x, torch.full((len(x),), s), y)
    return x


@pytest.mark.parametrize("steps", [4, 25])
def test_ddim_on_the_flow_schedule_is_euler_on_the_flow_ode(steps):
    g = torch.Generator().manual_seed(1)
    x1, y = torch.randn(500, 2, generator=g), torch.randint(0, 2, (500,), generator=g)
    denoise = denoiser(as_network(exact_velocity))
    ddim = samplers.ddim(denoise, flow.schedule(T), x1, y, steps, clip_x0=False)
    assert torch.allclose(ddim, euler_in_flow_time(exact_velocity, x1, y, steps), atol=1e-4)


def sampled(sampler, steps, field=exact_velocity, n=2000):
    g = torch.Generator().manual_seed(2)
    x1, y = torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g)
    denoise = denoiser(as_network(field))
    ts = samplers.timesteps(T, steps)
    if sampler == "ddim":
        x = samplers.ddim(denoise, flow.schedule(T), x1, y, ts, clip_x0=False)
    else:
        x = samplers.heun(denoise, flow.schedule(T), x1, y, ts, clip_x0=False)
    return x, MU[y] + S * x1, y  # the exact ODE's end point for each noise


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("heun", 2)])
def test_euler_and_heun_reach_the_data_at_orders_one_and_two(sampler, order):
    errors = []
    for steps in (20, 40, 80):
        x, exact, _ = sampled(sampler, steps)
        errors.append((x - exact).norm(dim=1).mean().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(2 ** order * 0.75 < r < 2 ** order * 1.35 for r in ratios), (errors, ratios)
    x, _, y = sampled(sampler, 40, n=8000)
    for label in (0, 1):
        pick = x[y == label]
        assert torch.allclose(pick.mean(0), MU[label], atol=0.05) and torch.allclose(pick.var(0), torch.full((2,), S**2), atol=0.03)


def test_a_broken_velocity_misses_the_data():
    def wrong(x, s, y):  # the mean term's sign flipped
        return exact_velocity(x, s, y) + 2 * MU[y]
    x, exact, _ = sampled("heun", 40, field=wrong)
    assert (x - exact).norm(dim=1).mean() > 1.0


def test_the_shift_moves_steps_toward_noise_and_keeps_the_ends():
    s = torch.linspace(0, 1, 11)
    assert torch.equal(flow.shifted(s, 1.0), s)
    shifted = flow.shifted(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > s[1:-1]).all()
    assert torch.allclose(flow.shifted(torch.tensor(0.5), 3.0), torch.tensor(0.75))  # 3·0.5 / (1 + 2·0.5)


@pytest.mark.parametrize("shift", [3.0, 0.5])
def test_a_sampler_s_shift_on_the_flow_grid_is_sd3_s_shift(shift):
    """samplers.shifted works on any schedule through σ/α; on the flow grid it must land each
    step on the grid point nearest SD3's shifted time (and keep pure noise first)."""
    ts = samplers.timesteps(T, 10)
    got = samplers.shifted(flow.schedule(T), ts, shift)
    wanted = [ts[0]] + [int((flow.times(T) - flow.shifted(flow.times(T)[t], shift)).abs().argmin()) for t in ts[1:]]
    assert got == wanted and got[0] == T - 1 and len(set(got)) == len(got)
    moved = got[1:] if shift > 1 else ts[1:]
    assert all(a > b for a, b in zip(moved, (ts if shift > 1 else got)[1:]))  # toward noise above 1, away below


@pytest.mark.parametrize("kind", ["flow", "v", "eps"])
def test_distillation_s_target_gives_the_wanted_x0_through_the_sampler_s_reading(kind):
    """Objective.distill_target's output, read back as the samplers read the network, must give
    x̂0 = the target: the student is taught in its own terms what the sampler will use."""
    from diffcli.schedules import make_schedule

    objective = Objective.flow(T, "uniform") if kind == "flow" else Objective.ddpm(make_schedule("cosine", T), kind)
    from diffcli.schedules import q_sample

    g = torch.Generator().manual_seed(4)
    x0, t = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 250, 500, 998, 999])
    x = q_sample(objective.schedule, x0, t, torch.randn(6, 3, generator=g))  # any x: x0's path with some noise
    x_in, time, out = objective.distill_target(x, t, x0)
    network = objective.network(lambda xi, ti, y: out if (torch.equal(xi, x_in) and torch.equal(ti, time)) else out * 0)
    _, x0_hat = samplers.predictions(network, objective.schedule, objective.prediction)(x, t, None)
    tolerance = 2e-3 if kind == "eps" else 1e-4  # ε's x̂0 divides by sqrt(ᾱ), 0.006 at the last cosine step
    assert torch.allclose(x0_hat, x0, atol=tolerance), (x0_hat - x0).abs().max()


def test_dpm_solver_runs_a_flow_model_through_the_same_equivalence():
    """DPM-Solver++(2M) starts at ᾱ = 0 (pure noise, λ = -inf): its first step is DDIM's, and
    every point stays finite and lands on the exact end point."""
    g = torch.Generator().manual_seed(3)
    x1, y = torch.randn(2000, 2, generator=g), torch.randint(0, 2, (2000,), generator=g)
    x = samplers.dpmpp_2m(denoiser(as_network(exact_velocity)), flow.schedule(T), x1, y, 20, clip_x0=False)
    assert torch.isfinite(x).all() and (x - (MU[y] + S * x1)).norm(dim=1).mean() < 0.02


def test_diffusers_flow_match_euler_takes_the_same_steps_and_the_same_shift():
    """diffusers' FlowMatchEulerDiscreteScheduler, given diffcli's trailing grid of flow times,
    steps the exact field to the same points as DDIM on flow.schedule, step for step; and
    its shift is flow.shifted (on a grid it is given: its own default grid also shifts
    its end point, so it is not compared)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 8
    ts = samplers.timesteps(T, steps)
    grid = flow.times(T)[ts].tolist()
    g = torch.Generator().manual_seed(4)
    x1, y = torch.randn(300, 2, generator=g), torch.randint(0, 2, (300,), generator=g)
    ours = []
    samplers.ddim(denoiser(as_network(exact_velocity)), flow.schedule(T), x1, y, ts, clip_x0=False,
                  callback=lambda i, t, x, x0: ours.append(x.clone()))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    sched.set_timesteps(sigmas=grid)
    x = x1.clone()
    for i, t in enumerate(sched.timesteps):
        c = ((1 - sched.sigmas[i]) ** 2 + sched.sigmas[i] ** 2).sqrt()
        assert torch.allclose(x / c, ours[i], atol=1e-4), i  # our x is the variance-preserving one
        x = sched.step(exact_velocity(x, torch.full((len(x),), t.item() / T), y), t, x).prev_sample
    end = samplers.ddim(denoiser(as_network(exact_velocity)), flow.schedule(T), x1, y, ts, clip_x0=False)
    assert torch.allclose(x, end, atol=1e-4)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    shifted.set_timesteps(sigmas=grid)
    assert torch.allclose(shifted.sigmas[:-1].double(), flow.shifted(torch.tensor(grid, dtype=torch.float64), 3.0), atol=1e-6)
