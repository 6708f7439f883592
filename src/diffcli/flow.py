"""Flow matching (rectified flow): the straight path x_s = (1 - s) x0 + s ε from data
(s = 0) to noise (s = 1), and a network that predicts its velocity v = ε - x0 (Liu et al.
2022, rectified flow; Lipman et al. 2023, flow matching with the conditional OT path).
Training times s are drawn logit-normal (Esser et al. 2024, SD3, §3.1: m = 0, s = 1) or
uniform, and a few-step sampler spreads its steps with SD3's shift (§5.3.2).

One set of samplers serves both objectives, through the Gaussian-path equivalence: the
flow path is a Gaussian path with α = 1 - s and σ = s, so x_s / sqrt(α² + σ²) is a
variance-preserving sample with ᾱ = α² / (α² + σ²) (Kingma et al. 2021, VDM, §3; Lipman et
al. 2023, §4.1). `schedule(T)` is that ᾱ on a grid of T flow times, and
`objective.Objective.network` reads a velocity as the v-prediction of that schedule, so that
from x_s = (1 - s) x0 + s ε and v = ε - x0 the samplers step with x0 = x_s - s v and
ε = x_s + (1 - s) v. DDIM on this schedule is then exactly Euler on the flow ODE
dx/ds = v (tested), and EDM's Heun a second-order method on the same ODE.
"""

from __future__ import annotations

import torch

from diffcli.schedules import Schedule

TIME_SAMPLINGS = ("logit-normal", "uniform")
LOGIT_NORMAL = (0.0, 1.0)  # SD3's (m, s): the default, which puts most training at mid s


def path(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s ε, with s per image."""
    s = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The target: d x_s / ds = ε - x0."""
    return eps - x0


def training_times(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """n flow times: sigmoid of N(m, s²) (logit-normal, in (0, 1)), or uniform in [0, 1)."""
    if how == "logit-normal":
        m, scale = LOGIT_NORMAL
        return torch.sigmoid(m + scale * torch.randn(n, generator=gen))
    if how == "uniform":
        return torch.rand(n, generator=gen)
    raise ValueError(f"unknown time sampling {how!r}; choose one of {', '.join(TIME_SAMPLINGS)}")


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift (eq. 23): shift·s / (1 + (shift - 1) s). Above 1 it moves the steps
    of a grid toward the noise end, where few-step sampling needs them."""
    return shift * s / (1 + (shift - 1) * s)


def times(T: int) -> torch.Tensor:
    """The flow times of the T grid points, index k at s = (k + 1) / T: the last is pure noise."""
    return torch.arange(1, T + 1, dtype=torch.float64) / T


def schedule(T: int) -> Schedule:
    """The variance-preserving schedule the flow path is equivalent to on the grid `times(T)`:
    ᾱ = (1 - s)² / ((1 - s)² + s²), and β from its ratios, as samplers.py expects."""
    s = times(T)
    abar = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return Schedule("flow", (1 - abar / previous).float(), abar.float())

