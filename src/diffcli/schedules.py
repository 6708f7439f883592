"""Noise schedules of the forward process q(x_t | x_0) and conversions between targets.

A `Schedule` is immutable: betas and cumulative alphas computed once in float64
(products of ~1000 factors lose precision in float32) and stored as float32.
Timesteps are 0-indexed: t = 0 is the first noising step, t = T - 1 the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    name: str
    betas: torch.Tensor  # (T,) float32
    alphas_cumprod: torch.Tensor  # (T,) float32, ᾱ_t = prod_{s<=t} (1 - β_s)

    @property
    def T(self) -> int:
        return self.betas.shape[0]


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020, §4): betas linear from 1e-4 to 0.02 at T = 1000.

    For other T the end points are rescaled by 1000 / T so that the total noise
    added stays the same (as in improved-diffusion's `get_named_beta_schedule`).
    """
    scale = 1000.0 / T
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: f(u) = cos²((u + s) / (1 + s) · π/2), u = t / T."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 - ᾱ(t+1)/ᾱ(t) from eq. 17, clipped at 0.999 to avoid a singularity at t = T."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = cosine_alpha_bar(u, s)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_schedule(name: str, T: int) -> Schedule:
    if T < 2:
        raise ValueError(f"timesteps must be at least 2, got {T}")
    if name == "linear":
        betas = linear_betas(T)
    elif name == "cosine":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return Schedule(name, betas.float(), alphas_cumprod.float())


def _bcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] per batch element and shape it to broadcast against `like`."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (Ho et al. 2020, eq. 4)."""
    abar = _bcast(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def v_target(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0  (Salimans & Ho 2022, §4)."""
    abar = _bcast(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


# Conversions written in ᾱ directly so samplers can use them at any timestep
# (including ᾱ = 1 "after the last step"), with ᾱ a tensor broadcastable to x.


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """From x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε and v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0: ε = sqrt(1-ᾱ) x_t + sqrt(ᾱ) v."""
    return (1 - abar).sqrt() * x_t + abar.sqrt() * v


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v
