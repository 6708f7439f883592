"""Sample-quality maths (issue #5 builds `diffcli eval` on these).

Pure functions on feature matrices (N, D); float64 throughout, since the Fréchet
distance subtracts large traces and loses digits in float32.
"""

from __future__ import annotations

import torch


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """d² = |μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½) (Dowson & Landau 1982; the FID of
    Heusel et al. 2017, eq. 6). Σ1^½ Σ2 Σ1^½ is symmetric, so its root comes from eigh,
    which stays real where scipy's sqrtm of Σ1 Σ2 can turn complex."""
    mu1, mu2, cov1, cov2 = (x.double() for x in (mu1, mu2, cov1, cov2))
    root1 = _sqrt_psd(cov1)
    cross = _sqrt_psd(root1 @ cov2 @ root1)
    return float((mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross))


def nearest_neighbours(queries: torch.Tensor, pool: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(Euclidean distance, index) of each query's nearest row of `pool`, both (N, D).

    The search uses |a|² + |b|² - 2ab in float32 (one matmul per chunk); the distance to
    the neighbour found is then recomputed directly, so a near-copy reads as ~0 rather
    than as the cancellation error of the expanded form.
    """
    q, p = queries.float(), pool.float()
    p_sq = p.square().sum(1)
    index = torch.cat([(p_sq[None, :] - 2 * c @ p.T).argmin(1) for c in q.split(chunk)])
    return (q - p[index]).norm(dim=1), index
