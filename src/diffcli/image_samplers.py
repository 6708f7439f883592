"""Samplers that start from an image rather than from noise: DDIM inversion (data ->
noise) and RePaint inpainting. Pure functions of a denoiser, like samplers.py, whose
steps they reuse; edit.py drives them.
"""

from __future__ import annotations

import torch

from diffcli.samplers import Denoiser, RandnLike, abar_at, ddim_step, ddpm_step, plan, predict, timesteps
from diffcli.schedules import Schedule, q_sample
from diffcli.spec import DDIM_SAMPLERS, SamplerSpec


def ddim_invert(denoise: Denoiser, schedule: Schedule, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """Run the deterministic DDIM ODE forward, data -> noise, over the same trailing
    timesteps `ddim` walks down (Song et al. 2021, §4.3; Dhariwal & Nichol 2021, App. F):
    x_t = sqrt(ᾱ_t) x̂0 + sqrt(1-ᾱ_t) ε̂, with ε̂ taken at the previous, less noisy point.
    The first step, from the clean image, evaluates the model at the smallest listed
    timestep, as diffusers' DDIMInverseScheduler does. Unclipped, so it is invertible."""
    ts = timesteps(schedule.T, steps)[::-1]  # ascending
    x = x0.float()
    for i, t in enumerate(ts):
        s = ts[i - 1] if i > 0 else -1  # where x is now; -1: the clean image
        eps, _ = denoise(x, torch.full((x.shape[0],), max(s, ts[0]), device=x.device, dtype=torch.long), labels)
        abar_s, abar_t = abar_at(schedule, s, x), abar_at(schedule, t, x)
        x0_hat = (x - (1 - abar_s).sqrt() * eps) / abar_s.sqrt()
        x = abar_t.sqrt() * x0_hat + (1 - abar_t).sqrt() * eps
    return x


def repaint(spec: SamplerSpec, denoise: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor,
            randn_like: RandnLike, known: torch.Tensor, keep: torch.Tensor, jumps: int = 1) -> torch.Tensor:
    """Inpainting (RePaint, Lugmayr et al. 2022, Alg. 1) with DDIM or DDPM steps: after each
    step t -> s the kept region (`keep` = 1) is replaced by `known` noised to s, and each
    step is done `jumps` times, going back from x_s to x_t through q(x_t | x_s) (eq. 9's
    resampling, jump length 1) so that the redrawn region comes to agree with what is kept.
    At the end the kept region is `known` itself."""
    spec = spec.resolve(schedule.T)
    if spec.sampler not in (*DDIM_SAMPLERS, "ddpm"):
        raise ValueError("repaint steps with ddim (euler) or ddpm")
    ts = plan(spec, schedule)

    def noised(x0, t):
        return q_sample(schedule, x0, torch.full((len(x0),), t, device=x0.device), randn_like(x0))

    x = keep * noised(known, ts[0]) + (1 - keep) * noise.float()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        for turn in range(jumps):
            eps, x0 = predict(denoise, x, t, labels, spec.clip, schedule)
            if spec.sampler == "ddpm":
                x_s = ddpm_step(schedule, x, t, x0, randn_like(x) if t > 0 else None, spec.variance)
            else:
                x_s = ddim_step(schedule, x, t, s, eps, x0, spec.eta, randn_like(x) if spec.eta > 0 and s >= 0 else None)
            x_s = keep * (known if s < 0 else noised(known, s)) + (1 - keep) * x_s
            if turn + 1 < jumps:  # back up one step and redo it: q(x_t | x_s) = N(sqrt(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I)
                ratio = abar_at(schedule, t, x) / abar_at(schedule, s, x)
                x = ratio.sqrt() * x_s + (1 - ratio).sqrt() * randn_like(x)
        x = x_s
    return x
