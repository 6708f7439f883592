"""Samplers as pure functions, in the style of NVlabs/edm's `generate.py`.

Each takes a denoiser `denoise(x_t, t, y) -> ε̂` (t a (B,) long tensor of 0-indexed
timesteps), a `Schedule`, the starting noise x_T, labels y, and — where noise is
drawn on the way — a `randn_like(x)` source. No model classes are imported here:
`as_eps` and `guided` build the denoiser from any network-like callable.

An optional `callback(step, t, x_t, x0_hat)` sees every step (for trajectories).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from diffcli.schedules import Schedule, eps_from_v, eps_from_x0, x0_from_eps

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]]

SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20}  # ddpm always runs all T steps


class PerImageNoise:
    """`randn_like` where image i draws from its own generator seeded with seeds[i].

    Image 17 is then the same picture in a batch of 1 or of 256 (DESIGN.md).
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} per-image generators")
        draws = [torch.randn(like.shape[1:], generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def as_eps(model: Callable, schedule: Schedule, prediction: str) -> Denoiser:
    """Turn a network predicting ε or v into a denoiser predicting ε."""
    if prediction == "eps":
        return model
    if prediction != "v":
        raise ValueError(f"unknown prediction target {prediction!r}")

    def denoise(x, t, y):
        abar = schedule.alphas_cumprod.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
        return eps_from_v(x, model(x, t, y).to(x.dtype), abar)

    return denoise


def guided(denoise: Denoiser, scale: float, null_label: int) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 in ε form):
    ε̃ = ε(x, ∅) + w (ε(x, y) - ε(x, ∅)). w = 1 is the plain conditional model and
    w = 0 the unconditional one; both then need one forward pass, others one pass of 2B.
    """
    if scale == 1.0:
        return denoise

    def guided_denoise(x, t, y):
        null = torch.full_like(y, null_label)
        if scale == 0.0:
            return denoise(x, t, null)
        eps = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = eps.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided_denoise


def _abar(schedule: Schedule, t: int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t as a 0-d tensor on like's device; t = -1 means "after the last step" (ᾱ = 1)."""
    value = schedule.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)
    return value.to(device=like.device, dtype=torch.float32)


def _predict(denoise, schedule, x, t, y, clip_x0):
    """ε̂ and x̂0 at timestep t; with clipping, ε̂ is recomputed from the clipped x̂0 so both agree."""
    abar = _abar(schedule, t, x)
    eps = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), y).float()
    x0 = x0_from_eps(x, eps, abar)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x, x0, abar)
    return eps, x0


def ddpm(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, randn_like: RandnLike,
         variance: str = "beta_tilde", clip_x0: bool = True, callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling through all T steps (Ho et al. 2020, Alg. 2, written with the
    posterior q(x_{t-1} | x_t, x̂0) of eq. 7). variance: "beta_tilde" (β̃_t, eq. 7, the
    default) or "beta" (β_t); both appear in §3.2 of the paper."""
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}")
    x = noise.float()
    betas = schedule.betas
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        eps, x0 = _predict(denoise, schedule, x, t, labels, clip_x0)
        abar_t, abar_prev = _abar(schedule, t, x), _abar(schedule, t - 1, x)
        beta_t = betas[t].to(x.device)
        # eq. 7: μ̃ = sqrt(ᾱ_{t-1}) β_t / (1-ᾱ_t) x0 + sqrt(α_t) (1-ᾱ_{t-1}) / (1-ᾱ_t) x_t
        mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0 + ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x
        if callback is not None:
            callback(i, t, x, x0)
        if t > 0:
            var = beta_t * (1 - abar_prev) / (1 - abar_t) if variance == "beta_tilde" else beta_t
            x = mean + var.sqrt() * randn_like(x)
        else:
            x = mean
    return x


def timesteps(T: int, steps: int) -> list[int]:
    """Evenly spaced timesteps, descending, starting at T - 1: the "trailing" spacing
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Table 2), equal to diffusers' timestep_spacing="trailing". The first step then
    starts from the noisiest timestep the model was trained on, which "leading"
    spacing (diffusers' default, t = 980 for 50 of 1000) never visits."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    ts = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round().long() - 1).tolist()
    return ts[:steps]


def ddim(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, steps: int,
         eta: float = 0.0, randn_like: RandnLike | None = None, clip_x0: bool = True,
         callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from t to the next timestep s (ᾱ_s = 1 after the last):
    x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ²) ε̂ + σ z, with eq. 16's
    σ = η sqrt((1-ᾱ_s)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_s). η = 0 is deterministic; η = 1 with
    all T steps is DDPM's ancestral sampler with variance β̃_t."""
    if eta > 0 and randn_like is None:
        raise ValueError("ddim with eta > 0 draws noise: pass randn_like")
    x = noise.float()
    ts = timesteps(schedule.T, steps)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = _predict(denoise, schedule, x, t, labels, clip_x0)
        abar_t, abar_s = _abar(schedule, t, x), _abar(schedule, s, x)
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
        if callback is not None:
            callback(i, t, x, x0)
        x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and s >= 0:
            x = x + sigma * randn_like(x)
    return x


def dpmpp_2m(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, steps: int,
             clip_x0: bool = True, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), deterministic, on the same trailing
    timesteps as DDIM. With α_t = sqrt(ᾱ_t), σ_t = sqrt(1-ᾱ_t), λ = log(α/σ), h = λ_s - λ_t:
    x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1) D, where D = x̂0 on the first step and
    (1 + 1/2r) x̂0_t - (1/2r) x̂0_prev after it (r = h_prev / h). The last step, to ᾱ = 1,
    is first order and returns x̂0 (lower_order_final in the reference code)."""
    x = noise.float()
    ts = timesteps(schedule.T, steps)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        _, x0 = _predict(denoise, schedule, x, t, labels, clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
        if s < 0:
            x = x0
            break
        abar_t, abar_s = _abar(schedule, t, x), _abar(schedule, s, x)
        lam_t = 0.5 * (abar_t.log() - (1 - abar_t).log())
        lam_s = 0.5 * (abar_s.log() - (1 - abar_s).log())
        h = lam_s - lam_t
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = ((1 - abar_s) / (1 - abar_t)).sqrt() * x - abar_s.sqrt() * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sample(name: str, denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor,
           randn_like: RandnLike, steps: int | None = None, eta: float = 0.0, variance: str = "beta_tilde",
           clip_x0: bool = True, callback: Callback = None) -> torch.Tensor:
    """Dispatch by sampler name, for callers that take the name from a user."""
    if name == "ddpm":
        if steps not in (None, schedule.T):
            raise ValueError(f"ddpm runs all {schedule.T} steps; for fewer use ddim (with --eta 1 for a stochastic one)")
        return ddpm(denoise, schedule, noise, labels, randn_like, variance, clip_x0, callback)
    steps = steps or DEFAULT_STEPS[name]
    if name == "ddim":
        return ddim(denoise, schedule, noise, labels, steps, eta, randn_like, clip_x0, callback)
    if name == "dpm++":
        return dpmpp_2m(denoise, schedule, noise, labels, steps, clip_x0, callback)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
