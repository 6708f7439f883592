"""Samplers as pure functions, in the style of NVlabs/edm's `generate.py`.

Each takes a denoiser `denoise(x_t, t, y) -> (ε̂, x̂0)` (t a (B,) long tensor of
0-indexed timesteps), a `Schedule`, the starting noise x_T, labels y, and — where noise
is drawn on the way — a `randn_like(x)` source. No model classes are imported here:
`predictions` builds the denoiser from any network-like callable (`guidance.guided`
mixes networks first).

One update of each sampler is its own function (`ddpm_step`, `ddim_step`), the
stateless counterpart of diffusers' `scheduler.step(model_output, t, x)`; the loops
only choose timesteps and draw noise. An optional `callback(step, t, x_t, x0_hat)`
sees every step (for trajectories).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from diffcli.schedules import Schedule, eps_from_v, eps_from_x0, x0_from_eps, x0_from_v
from diffcli.spec import DDIM_SAMPLERS, SamplerSpec

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
RandnLike = Callable[[torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]]



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


def predictions(network: Network, schedule: Schedule, prediction: str) -> Denoiser:
    """Turn a network predicting ε or v into a denoiser returning (ε̂, x̂0).

    Both come straight from the output, as in diffusers: for v, x̂0 = sqrt(ᾱ) x - sqrt(1-ᾱ) v
    never divides by sqrt(ᾱ), which is ~5e-5 at the last cosine timestep.
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"unknown prediction target {prediction!r}")

    def denoise(x, t, y):
        abar = schedule.alphas_cumprod.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
        out = network(x, t, y).float()
        if prediction == "eps":
            return out, x0_from_eps(x, out, abar)
        return eps_from_v(x, out, abar), x0_from_v(x, out, abar)

    return denoise


def abar_at(schedule: Schedule, t: int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t as a 0-d tensor on like's device; t = -1 means "after the last step" (ᾱ = 1)."""
    value = schedule.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)
    return value.to(device=like.device, dtype=torch.float32)


def predict(denoise, x, t, y, clip_x0, schedule):
    """ε̂ and x̂0 at timestep t; with clipping, ε̂ is recomputed from the clipped x̂0 so both agree."""
    eps, x0 = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), y)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x, x0, abar_at(schedule, t, x))
    return eps, x0


def ddpm_step(schedule: Schedule, x: torch.Tensor, t: int, x0: torch.Tensor, noise: torch.Tensor | None,
              variance: str = "beta_tilde") -> torch.Tensor:
    """x_{t-1} ~ q(x_{t-1} | x_t, x̂0) (Ho et al. 2020, eq. 7):
    μ̃ = sqrt(ᾱ_{t-1}) β_t / (1-ᾱ_t) x̂0 + sqrt(α_t) (1-ᾱ_{t-1}) / (1-ᾱ_t) x_t, plus σ z with
    σ² = β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t) ("beta_tilde") or β_t ("beta"); no noise at t = 0."""
    abar_t, abar_prev = abar_at(schedule, t, x), abar_at(schedule, t - 1, x)
    beta_t = schedule.betas[t].to(x.device)
    mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0 + ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x
    if t == 0:
        return mean
    var = beta_t * (1 - abar_prev) / (1 - abar_t) if variance == "beta_tilde" else beta_t
    return mean + var.sqrt() * noise


def ddim_step(schedule: Schedule, x: torch.Tensor, t: int, s: int, eps: torch.Tensor, x0: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from t to s < t (s = -1: ᾱ = 1, after the last step):
    x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ²) ε̂ + σ z with eq. 16's
    σ = η sqrt((1-ᾱ_s)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_s)."""
    abar_t, abar_s = abar_at(schedule, t, x), abar_at(schedule, s, x)
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
    out = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and s >= 0:
        out = out + sigma * noise
    return out


def ddim_x0_for(schedule: Schedule, x_t: torch.Tensor, x_s: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """The x̂0 that makes one deterministic `ddim_step` go from x_t to x_s: with α = sqrt(ᾱ),
    σ = sqrt(1-ᾱ), x̃ = (x_s - (σ_s/σ_t) x_t) / (α_s - (σ_s/σ_t) α_t) (Salimans & Ho 2022, Alg. 2;
    s = -1 gives x_s itself). The target of distillation (distill.py)."""
    abar_t, abar_s = abar_at(schedule, t, x_t), abar_at(schedule, s, x_t)
    ratio = ((1 - abar_s) / (1 - abar_t)).sqrt()
    return (x_s - ratio * x_t) / (abar_s.sqrt() - ratio * abar_t.sqrt())


def ddpm(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, randn_like: RandnLike,
         variance: str = "beta_tilde", clip_x0: bool = True, callback: Callback = None, first: int = 0) -> torch.Tensor:
    """Ancestral sampling through all T steps (Ho et al. 2020, Alg. 2, with `ddpm_step`).
    `first` > 0 starts part-way, at timestep T - 1 - first, from `noise` = x_t there
    (SDEdit: every sampler here takes `first`, an index into its list of timesteps)."""
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}")
    x = noise.float()
    for i, t in enumerate(range(schedule.T - 1 - first, -1, -1), start=first):
        _, x0 = predict(denoise, x, t, labels, clip_x0, schedule)
        if callback is not None:
            callback(i, t, x, x0)
        x = ddpm_step(schedule, x, t, x0, randn_like(x) if t > 0 else None, variance)
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


def ddim(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, steps: int | list[int],
         eta: float = 0.0, randn_like: RandnLike | None = None, clip_x0: bool = True,
         callback: Callback = None, first: int = 0) -> torch.Tensor:
    """DDIM on the trailing `timesteps`. η = 0 is deterministic; η = 1 with all T steps is
    DDPM's ancestral sampler with variance β̃_t (σ² of eq. 16 equals β̃_t then)."""
    if eta > 0 and randn_like is None:
        raise ValueError("ddim with eta > 0 draws noise: pass randn_like")
    x = noise.float()
    ts = timesteps(schedule.T, steps) if isinstance(steps, int) else steps  # a count (trailing) or the timesteps
    for i, t in enumerate(ts[first:], start=first):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = predict(denoise, x, t, labels, clip_x0, schedule)
        if callback is not None:
            callback(i, t, x, x0)
        x = ddim_step(schedule, x, t, s, eps, x0, eta, randn_like(x) if eta > 0 and s >= 0 else None)
    return x


def dpmpp_2m(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, steps: int | list[int],
             clip_x0: bool = True, callback: Callback = None, first: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), deterministic, on the same trailing
    timesteps as DDIM. With α_t = sqrt(ᾱ_t), σ_t = sqrt(1-ᾱ_t), λ = log(α/σ), h = λ_s - λ_t:
    x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1) D, where D = x̂0 on the first step and
    (1 + 1/2r) x̂0_t - (1/2r) x̂0_prev after it (r = h_prev / h). The last step, to ᾱ = 1,
    is first order and returns x̂0 (lower_order_final in the reference code)."""
    x = noise.float()
    ts = timesteps(schedule.T, steps) if isinstance(steps, int) else steps  # a count (trailing) or the timesteps
    x0_prev, h_prev = None, None  # a start part-way (first > 0) begins with a first-order step
    for i, t in enumerate(ts[first:], start=first):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        _, x0 = predict(denoise, x, t, labels, clip_x0, schedule)
        if callback is not None:
            callback(i, t, x, x0)
        if s < 0:
            x = x0
            break
        abar_t, abar_s = abar_at(schedule, t, x), abar_at(schedule, s, x)
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


HEUN_SIGMA_MAX = 80.0  # EDM's σ_max (Karras et al. 2022, Table 1): heun steps Euler above it, Karras spacing starts there


def heun(denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, ts: list[int],
         clip_x0: bool = True, callback: Callback = None, first: int = 0) -> torch.Tensor:
    """EDM's deterministic second-order sampler (Karras et al. 2022, Alg. 1 without churn)
    on the model's own discrete timesteps `ts`. With x~ = x / sqrt(ᾱ) and σ = sqrt((1-ᾱ)/ᾱ)
    the probability-flow ODE is dx~/dσ = ε̂, and DDIM is its Euler step; Heun then
    evaluates ε̂ again where Euler lands and steps with the mean of the two slopes:
    x~_s = x~_t + (σ_s - σ_t) (ε̂_t + ε̂_s') / 2. Written as the Euler point plus a
    correction, so x~ itself (huge at the noisiest cosine timesteps) is never formed. The
    last step, to σ = 0, stays Euler, and so does a step from above HEUN_SIGMA_MAX: there
    the slope changes only near the far end of a step that spans orders of magnitude of σ,
    and the trapezoid, weighting that end by half the step, overshoots (on the Gaussian
    oracle, cosine, 25 steps: the variance off by far more than DDIM's). 2 len(ts) - 1
    evaluations at most."""
    x = noise.float()
    for i, t in enumerate(ts[first:], start=first):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = predict(denoise, x, t, labels, clip_x0, schedule)
        if callback is not None:
            callback(i, t, x, x0)
        euler = ddim_step(schedule, x, t, s, eps, x0)
        abar_t, abar_s = abar_at(schedule, t, x), abar_at(schedule, s, x)
        if s < 0 or (1 - abar_t) / abar_t > HEUN_SIGMA_MAX**2:
            x = euler
            continue
        eps_s, _ = predict(denoise, euler, s, labels, clip_x0, schedule)
        # sqrt(ᾱ_s) (σ_s - σ_t) = sqrt(1-ᾱ_s) - sqrt(ᾱ_s (1-ᾱ_t) / ᾱ_t): the step in x, per unit of slope
        span = (1 - abar_s).sqrt() - (abar_s * (1 - abar_t) / abar_t).sqrt()
        x = euler + span * (eps_s - eps) / 2
    return x


def karras_timesteps(schedule: Schedule, steps: int, rho: float = 7.0) -> list[int]:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, each
    taken to the timestep whose σ is nearest in log σ (the model knows only its T). σ_max is
    EDM's 80 where the schedule goes higher (cosine reaches 2e4: a ramp from there spends
    most steps where nothing changes), and the first step still starts at T - 1, where the
    model was trained on pure noise. Where two σ_i fall on one timestep it is visited once,
    so a discrete schedule may give fewer than `steps` timesteps."""
    abar = schedule.alphas_cumprod.double()
    log_sigma = 0.5 * ((1 - abar).log() - abar.log())
    lo, top = log_sigma[0].exp(), log_sigma[-1].exp()
    hi = min(top, torch.tensor(HEUN_SIGMA_MAX, dtype=torch.float64))
    n = steps - 1 if top > hi else steps
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    wanted = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    picked = (log_sigma[None, :] - wanted.log()[:, None]).abs().argmin(1).tolist()
    return sorted(set(picked) | ({schedule.T - 1} if top > hi else set()), reverse=True)


def shifted(schedule: Schedule, ts: list[int], shift: float) -> list[int]:
    """SD3's time shift (Esser et al. 2024, eq. 23) on any schedule: each step's noise-to-signal
    ratio σ/α times `shift`, taken to the timestep nearest in log(σ/α). On a flow schedule
    that is s -> shift·s / (1 + (shift - 1) s) (flow.shifted); above 1 it moves the steps
    toward the noise, where few-step sampling needs them. The first, noisiest step stays;
    where two steps fall on one timestep it is visited once."""
    abar = schedule.alphas_cumprod.double()
    log_ratio = 0.5 * ((1 - abar).log() - abar.log())  # +inf where ᾱ = 0 (a flow's pure noise)
    moved = [ts[0]] + [int((log_ratio - (log_ratio[t] + math.log(shift))).abs().argmin()) for t in ts[1:]]
    return list(dict.fromkeys(moved))


def plan(spec: SamplerSpec, schedule: Schedule) -> list[int]:
    """The timesteps `spec` visits on `schedule`, noisiest first."""
    spec = spec.resolve(schedule.T)
    if spec.sampler == "ddpm":
        return list(range(schedule.T - 1, -1, -1))
    ts = karras_timesteps(schedule, spec.steps) if spec.spacing == "karras" else timesteps(schedule.T, spec.steps)
    return ts if spec.shift == 1 else shifted(schedule, ts, spec.shift)


def sample(spec: SamplerSpec, denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor,
           randn_like: RandnLike, callback: Callback = None, first: int = 0) -> torch.Tensor:
    """Run the sampler `spec` names, with its settings, from `noise` = x_t at the timestep
    `plan(spec, T)[first]` (0: the start, pure noise); `spec` is resolved against
    `schedule.T` here, so its checks hold for every caller."""
    spec = spec.resolve(schedule.T)
    if spec.sampler == "ddpm":
        return ddpm(denoise, schedule, noise, labels, randn_like, spec.variance, spec.clip, callback, first)
    ts = plan(spec, schedule)
    if spec.sampler in DDIM_SAMPLERS:  # euler: SamplerSpec refused its eta > 0
        return ddim(denoise, schedule, noise, labels, ts, spec.eta, randn_like, spec.clip, callback, first)
    if spec.sampler == "heun":
        return heun(denoise, schedule, noise, labels, ts, spec.clip, callback, first)
    return dpmpp_2m(denoise, schedule, noise, labels, ts, spec.clip, callback, first)
