import math

import torch

from diffcli.metrics import frechet_distance, mean_cov


def test_identical_sets_are_at_distance_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    mu, cov = mean_cov(f)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_shifted_and_scaled_gaussians_match_the_closed_form():
    """For N(μ1, a² I) and N(μ2, b² I) in D dims: d² = |μ1-μ2|² + D (a - b)²."""
    d, a, b = 8, 1.5, 0.5
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, **f64), torch.full((d,), 0.3, **f64)
    got = frechet_distance(mu1, a**2 * torch.eye(d, **f64), mu2, b**2 * torch.eye(d, **f64))
    assert math.isclose(got, d * 0.09 + d * (a - b) ** 2, rel_tol=1e-9)


def test_general_covariances_match_the_commuting_case_and_are_symmetric():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    l1, l2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    c1, c2 = q @ torch.diag(l1) @ q.T, q @ torch.diag(l2) @ q.T  # same eigenvectors: closed form per eigenvalue
    mu = torch.zeros(6, dtype=torch.float64)
    expected = float((l1.sqrt() - l2.sqrt()).square().sum())
    assert math.isclose(frechet_distance(mu, c1, mu, c2), expected, rel_tol=1e-9)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    c3 = a @ a.T
    assert math.isclose(frechet_distance(mu, c1, mu, c3), frechet_distance(mu, c3, mu, c1), rel_tol=1e-8)


def test_sample_estimate_converges_to_the_population_value():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20000, 4, generator=g)
    y = 2 * torch.randn(20000, 4, generator=g) + 1
    got = frechet_distance(*mean_cov(x), *mean_cov(y))
    assert abs(got - (4 * 1 + 4 * (2 - 1) ** 2)) < 0.15
