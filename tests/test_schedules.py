import math

import pytest
import torch

from diffcli.schedules import (
    cosine_alpha_bar,
    eps_from_v,
    eps_from_x0,
    make_schedule,
    q_sample,
    v_target,
    x0_from_eps,
    x0_from_v,
)


def test_linear_schedule_is_ddpm_at_T_1000():
    s = make_schedule("linear", 1000)
    assert s.betas.dtype == torch.float32 and s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    # ᾱ_T for DDPM's linear schedule: prod(1 - β) ≈ 4.04e-5 (float64 closed form).
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert s.alphas_cumprod[-1].item() == pytest.approx(torch.prod(1 - betas).item(), rel=1e-5)


def test_linear_schedule_rescales_for_other_T():
    s = make_schedule("linear", 512)
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / 512, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02 * 1000 / 512, rel=1e-6)


@pytest.mark.parametrize("T", [1000, 512])
def test_cosine_alpha_bar_matches_closed_form(T):
    s = make_schedule("cosine", T)
    t = torch.arange(T, dtype=torch.float64)
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t)/f(0) with f(t) = cos²(((t/T)+s)/(1+s)·π/2); index t holds ᾱ after step t+1.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    closed = torch.tensor([f((k + 1) / T) / f(0) for k in range(T)], dtype=torch.float64)
    # Only the last beta is clipped at 0.999, everything before matches exactly.
    assert torch.allclose(s.alphas_cumprod[:-1].double(), closed[:-1], rtol=1e-5, atol=0), "cosine ᾱ_t vs eq. 17"
    assert s.betas.max().item() == pytest.approx(0.999)
    assert torch.all(s.betas[:-1] < 0.999)
    assert torch.allclose(cosine_alpha_bar(t / T) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64)),
                          torch.tensor([f(k / T) / f(0) for k in range(T)], dtype=torch.float64))


def test_unknown_schedule_and_tiny_T_are_refused():
    with pytest.raises(ValueError):
        make_schedule("sigmoid", 1000)
    with pytest.raises(ValueError):
        make_schedule("linear", 1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_moments(name):
    """x_t | x0 ~ N(sqrt(ᾱ_t) x0, (1 - ᾱ_t) I): check mean and variance over 200k draws."""
    s = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for t_val in (0, 100, 500, 999):
        t = torch.full((n,), t_val)
        xt = q_sample(s, x0, t, torch.randn(n, 1, generator=g))
        abar = s.alphas_cumprod[t_val].item()
        var = 1 - abar
        # standard errors: mean sqrt(var/n), variance var*sqrt(2/n); allow 5 of them
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5 * math.sqrt(var / n) + 1e-6), f"mean at t={t_val}"
        assert xt.var().item() == pytest.approx(var, abs=5 * var * math.sqrt(2 / n) + 1e-7), f"variance at t={t_val}"


def test_q_sample_is_exact_per_element():
    s = make_schedule("cosine", 1000)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    out = q_sample(s, x0, t, noise)
    for i in range(4):
        a = s.alphas_cumprod[t[i]]
        assert torch.allclose(out[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i], atol=1e-6)


def test_target_conversions_round_trip():
    s = make_schedule("linear", 1000)
    x0, eps = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    t = torch.tensor([0, 1, 250, 500, 750, 998])
    xt = q_sample(s, x0, t, eps)
    abar = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = v_target(s, x0, t, eps)
    assert torch.allclose(x0_from_eps(xt, eps, abar), x0, atol=1e-3)
    assert torch.allclose(eps_from_x0(xt, x0, abar), eps, atol=1e-3)
    assert torch.allclose(eps_from_v(xt, v, abar), eps, atol=1e-5)
    assert torch.allclose(x0_from_v(xt, v, abar), x0, atol=1e-5)
