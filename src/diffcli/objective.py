"""The objective: what a model learns and how the samplers read it, in one place.

- `ddpm` (Ho et al. 2020): x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε on a discrete schedule
  (schedules.py); the network sees the step index t and predicts ε or v.
- `flow` (flow.py; Liu et al. 2022, Lipman et al. 2023): x_s = (1 - s) x0 + s ε for s in
  [0, 1]; the network sees s·T and predicts the velocity ε - x0.

Training asks an `Objective` for its `times`, the network's `inputs` at them, and the
`target`. Sampling asks it for `network(model)`: the model as a predictor of ε or v
(`prediction`) on the variance-preserving `schedule`, at the schedule's grid index, which
is all samplers.py, guidance.py, image_samplers.py, edit.py and distill.py step with. For
`ddpm` that is the model itself. For `flow` it is the Gaussian-path equivalence (flow.py):
on the grid point of flow time s, with c = sqrt((1 - s)² + s²), the VP sample is x = x_s / c,
and the flow model's x̂0 = x_s - s v and ε̂ = x_s + (1 - s) v are those of the VP
v-prediction  v_vp = (1 - 2s) x + c v  (from v_vp = (1 - s)/c ε - s/c x0). It is affine in
the network's output for a fixed x, so guidance mixes either alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcli import flow
from diffcli.schedules import Schedule, make_schedule, q_sample, v_target

OBJECTIVES = ("ddpm", "flow")


@dataclass(frozen=True)
class Objective:
    kind: str  # "ddpm" or "flow"
    schedule: Schedule  # what the samplers step on; for flow, the VP schedule on its grid of flow times
    prediction: str  # what `network` returns: "eps" or "v" (a flow model reads as "v")
    time_sampling: str = "uniform"  # how training draws flow times (flow.TIME_SAMPLINGS); ddpm's t is uniform

    @property
    def T(self) -> int:
        return self.schedule.T

    def describe(self) -> str:
        if self.kind == "flow":
            return f"flow matching (velocity), {self.time_sampling} times, T={self.T}"
        return f"ddpm, {self.schedule.name} schedule, T={self.T}, {self.prediction} prediction"

    # --- training ---------------------------------------------------------------------

    def times(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n training times: step indices 0..T-1 (ddpm), or flow times in (0, 1)."""
        if self.kind == "flow":
            return flow.training_times(n, self.time_sampling, gen)
        return torch.randint(0, self.T, (n,), generator=gen)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The training times of grid indices (the samplers' t): itself, or the flow times."""
        return flow.times(self.T).float().to(index.device)[index] if self.kind == "flow" else index

    def inputs(self, x0: torch.Tensor, times: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the network's time input) for images x0 at `times` with `noise`."""
        if self.kind == "flow":
            return flow.path(x0, noise, times), times * self.T  # s·T: the scale of a step index
        return q_sample(self.schedule, x0, times, noise), times

    def target(self, x0: torch.Tensor, times: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return flow.velocity(x0, noise)
        return noise if self.prediction == "eps" else v_target(self.schedule, x0, times, noise)

    def weights(self, times: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        """Min-SNR-γ per image (Hang et al. 2023, eq. 9): min(SNR, γ) / SNR for ε, / (SNR + 1)
        for v; None for flow, whose weighting over time is its time sampling (SD3, §3.1)."""
        if self.kind == "flow" or min_snr_gamma <= 0:
            return None
        abar = self.schedule.alphas_cumprod.to(times.device)[times]
        snr = abar / (1 - abar)
        return snr.clamp(max=min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)

    # --- sampling ---------------------------------------------------------------------

    def network(self, model):
        """`model` (x, time input, y) as the samplers' network (x_vp, grid index, y) -> ε or v."""
        if self.kind != "flow":
            return model
        grid = flow.times(self.T).float()  # float32 before it moves: MPS has no float64

        def as_vp(x, t, y):
            s = grid.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
            c = ((1 - s) ** 2 + s**2).sqrt()
            v = model(x * c, s.flatten() * self.T, y).float()
            return (1 - 2 * s) * x + c * v

        return as_vp

    def wanted(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, time input, output) that make the model's x̂0 at the VP sample x,
        grid index t, equal `x0`: distillation's target in the model's own terms. For v this
        is (1 + SNR) |x̂0 - x0|², Salimans & Ho's "SNR+1" weighting; for flow s⁻²."""
        abar = self.schedule.alphas_cumprod.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
        if self.kind == "flow":
            s = flow.times(self.T).float().to(x.device)[t].reshape(abar.shape)
            x_s = x * ((1 - s) ** 2 + s**2).sqrt()
            return x_s, s.flatten() * self.T, (x_s - x0) / s  # from x0 = x_s - s v
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return x, t, eps if self.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0


def of(diffusion) -> Objective:
    """The objective of a `config.DiffusionConfig`."""
    if diffusion.objective == "flow":
        return Objective("flow", flow.schedule(diffusion.timesteps), "v", diffusion.time_sampling)
    return Objective("ddpm", make_schedule(diffusion.schedule, diffusion.timesteps), diffusion.prediction)
