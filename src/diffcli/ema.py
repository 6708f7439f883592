"""Exponential moving averages of the weights, and the maths of post-hoc EMA.

Two kinds of average, both updated after every optimizer step t = 1, 2, ... as
ê_t = β_t ê_{t-1} + (1 - β_t) θ_t, starting from the initial weights ê_0 = θ_0:

- the classic EMA a run samples from: β_t = min(decay, t / (t + 9)), a warm-up so that
  short runs are not an average of random initialisations (`classic_decay`);
- power-function EMAs (EDM2, Karras et al. 2024, eq. 127): β_t = (1 - 1/t)^(γ+1), whose
  averaging window grows with the run, so its length is a share of the run: the relative
  standard deviation σ_rel (eq. 123) of the weights' ages. Two of them (`PROFILES`) are
  kept and saved in snapshots during training (posthoc.py).

Post-hoc EMA: every average is a linear combination of θ_0..θ_T, with coefficients that
follow from its β sequence alone (`coefficients`). So an EMA that was never tracked is
approximated by the combination of saved snapshots whose coefficients come closest to
its own, in least squares (`solve`). EDM2 (Algorithm 3) solves this in continuous time;
here it is solved over the actual steps, grouped into at most about MAX_BINS bins
between the snapshot steps (every step is its own bin in runs up to that length). With
a snapshot every step the reconstruction is exact; otherwise the fit error `solve`
reports says how far the best combination is from the target, measured per step.
"""

from __future__ import annotations

import functools
import math

import torch

PROFILES = (0.05, 0.10)  # σ_rel of the two tracked power-function EMAs: EDM2's choice
MAX_BINS = 4096  # a longer run's steps are grouped into about this many bins (memory and time)


@torch.no_grad()
def update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ê ← β ê + (1 - β) θ, for every parameter (buffers are not averaged)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - beta)


def classic_decay(step: int, decay: float) -> float:
    """β of the run's own EMA for update `step` (1-based): warm-up (1 + n) / (10 + n) in
    the steps n done before it, capped at `decay`."""
    return min(decay, step / (step + 9))


@functools.cache  # called once a step by power_decay
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power γ whose profile has relative standard deviation σ_rel: the largest real
    root of γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²) (EDM2 eq. 126, Algorithm 2)."""
    t = sigma_rel ** -2
    roots = torch.linalg.eigvals(torch.tensor([[-7.0, t - 16, t - 12], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    return roots.real.max().item()  # as EDM2's std_to_exp


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 123: the relative standard deviation of a power profile with exponent γ."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_decay(step: int, sigma_rel: float) -> float:
    """β of a power-function EMA for update `step` (1-based); 0 at step 1 (EDM2 eq. 127)."""
    return (1 - 1 / step) ** (sigma_rel_to_gamma(sigma_rel) + 1)


def power_betas(steps: int, sigma_rel: float) -> torch.Tensor:
    """β_1..β_steps of a power-function EMA, in float64."""
    return torch.tensor([power_decay(t, sigma_rel) for t in range(1, steps + 1)], dtype=torch.float64)


def classic_betas(steps: int, decay: float) -> torch.Tensor:
    """β_1..β_steps of the run's own EMA, in float64."""
    return torch.tensor([classic_decay(t, decay) for t in range(1, steps + 1)], dtype=torch.float64)


def classic_sigma_rel(steps: int, decay: float) -> float:
    """The relative standard deviation of the classic EMA's weights' ages after `steps`:
    to compare it with the lengths `diffcli ema` takes."""
    w = coefficients(classic_betas(steps, decay), torch.tensor([steps]), torch.arange(-1, steps + 1))[:, 0]
    age = torch.arange(steps, -1, -1, dtype=torch.float64) / steps  # of θ_0..θ_T at the end, as a share of the run
    mean = (w * age).sum()
    return math.sqrt(max(((w * (age - mean) ** 2).sum()).item(), 0.0))


def coefficients(betas: torch.Tensor, at: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """How much of θ_0..θ_T the average with per-step `betas` (β_1..β_T) holds after each
    step in `at`, summed over bins: bin i holds the steps s with edges[i] < s ≤ edges[i+1]
    (edges start at -1, so θ_0 is in the first bin, and every step in `at` is an edge).

    ê_k = Σ_s w_k(s) θ_s with w_k(s) = (1 - β_s) Π_{j=s+1..k} β_j, where β_0 = 0 stands for
    the start at θ_0. In logs: w_k(s) = (1 - β_s) exp(L_k - L_s), L the cumulative log β,
    and the sum over a bin is a difference of a log-cumulative-sum-exp. Returns
    [bins, len(at)], float64."""
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), betas.double()])  # β_0..β_T
    # A power EMA's β_1 = 0 becomes 1e-30: a shift of L that cancels in L_k - L_s for s ≥ 1,
    # and leaves θ_0 (weighted Π β_j) a share of 1e-30 or less, as good as none.
    log_beta = torch.log(beta.clamp(min=1e-30))
    log_beta[0] = 0.0  # β_0 only stands for the start: (1 - β_0) exp(L_k - L_0) = Π β_j
    cum = torch.cumsum(log_beta, 0)  # L_s
    g = torch.logcumsumexp(torch.log1p(-beta) - cum, 0)  # log Σ_{s' ≤ s} (1 - β_s') exp(-L_s')
    hi = g[edges[1:]]
    lo = torch.cat([torch.full((1,), -math.inf, dtype=torch.float64), g[edges[1:-1]]])
    log_bin = hi + torch.log1p(-torch.exp(lo - hi).clamp(max=1.0 - 1e-16))  # log of the sum over each bin
    out = torch.exp(cum[at][None, :] + log_bin[:, None])
    return torch.where(edges[1:, None] <= at[None, :], out, torch.zeros((), dtype=torch.float64))


def bin_edges(steps: int, snapshot_steps: list[int]) -> torch.Tensor:
    """-1, then every snapshot step and a regular grid of at most MAX_BINS points up to `steps`."""
    grid = range(0, steps + 1, max(1, math.ceil(steps / MAX_BINS)))
    return torch.tensor(sorted({-1, *grid, *snapshot_steps, steps}), dtype=torch.long)


def solve(steps: list[int], profiles: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Weights x[i, p] for the snapshot of profile p (its β sequence, as long as `target`)
    saved after step steps[i], such that Σ x[i, p] ê_{i,p} comes closest to the average
    with per-step `target` betas after its last step; and the relative error of that fit
    (0: exact).

    Each bin's row is divided by the square root of its size, so the residual is measured
    per step, as if the weights were constant within a bin. The x sum to 1, as an
    average's coefficients do. `gelsd` copes with columns that coincide (after step 1
    every profile is θ_1)."""
    total = len(target)
    edges = bin_edges(total, steps)
    at = torch.tensor(steps)
    a = torch.stack([coefficients(betas, at, edges) for betas in profiles], 2).flatten(1)  # columns (i, p)
    b = coefficients(target, torch.tensor([total]), edges)
    scale = (edges[1:] - edges[:-1]).double().rsqrt()[:, None]
    x = torch.linalg.lstsq(a * scale, b * scale, driver="gelsd").solution[:, 0]
    x = x / x.sum()
    error = (torch.linalg.vector_norm((a @ x[:, None] - b) * scale) / torch.linalg.vector_norm(b * scale)).item()
    return x.view(len(steps), len(profiles)), error
