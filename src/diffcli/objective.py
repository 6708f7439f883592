"""The objective: what a model learns and how the samplers read it, in one place.

- `ddpm` (Ho et al. 2020): x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε on a discrete schedule
  (schedules.py); the network sees the step index t and predicts ε or v.
- `flow` (flow.py; Liu et al. 2022, Lipman et al. 2023): x_s = (1 - s) x0 + s ε for s in
  [0, 1]; the network sees s·T and predicts the velocity ε - x0.

Training asks an `Objective` for its `draw_times`, the network's `inputs` at them, and the
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
from diffcli.schedules import Schedule, eps_from_x0, make_schedule, q_sample, v_target

OBJECTIVES = ("ddpm", "flow")


@dataclass(frozen=True)
class Objective:
    kind: str  # "ddpm" or "flow"
    schedule: Schedule  # what the samplers step on; for flow, the VP schedule on its grid of flow times
    prediction: str  # what `network` returns: "eps" or "v" (a flow model reads as "v")
    time_sampling: str | None  # how training draws flow times (flow.TIME_SAMPLINGS); None for ddpm (uniform t)

    @classmethod
    def ddpm(cls, schedule: Schedule, prediction: str) -> Objective:
        return cls("ddpm", schedule, prediction, None)

    @classmethod
    def flow(cls, T: int, time_sampling: str) -> Objective:
        return cls("flow", flow.schedule(T), "v", time_sampling)

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def time_dtype(self) -> torch.dtype:
        """The dtype of `draw_times`: step indices, or flow times."""
        return torch.float32 if self.kind == "flow" else torch.long

    def describe(self) -> str:
        if self.kind == "flow":
            return f"flow matching (velocity), {self.time_sampling} times, T={self.T}"
        return f"ddpm, {self.schedule.name} schedule, T={self.T}, {self.prediction} prediction"

    # --- training ---------------------------------------------------------------------

    def draw_times(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n training times: step indices 0..T-1 (ddpm), or flow times in [0, 1)."""
        if self.kind == "flow":
            return flow.training_times(n, self.time_sampling, gen)
        return torch.randint(0, self.T, (n,), generator=gen)

    def grid_times(self, index: torch.Tensor) -> torch.Tensor:
        """The training times of grid indices (the samplers' t): the indices, or their flow times."""
        return self._flow_time(index, 1) if self.kind == "flow" else index

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

        def as_vp(x, t, y):
            x_s, s = self._flow_point(x, t)
            v = model(x_s, s.flatten() * self.T, y).float()
            return (1 - 2 * s) * x + _scale(s) * v

        return as_vp

    def distill_target(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, time input, output) that make the model's x̂0 at the VP sample x,
        grid index t, equal `x0`: distillation's target in the model's own terms. For v this
        is (1 + SNR) |x̂0 - x0|², Salimans & Ho's "SNR+1" weighting; for flow s⁻²."""
        if self.kind == "flow":
            x_s, s = self._flow_point(x, t)
            return x_s, s.flatten() * self.T, (x_s - x0) / s  # from x0 = x_s - s v
        abar = self.schedule.alphas_cumprod.to(x.device)[t].reshape(-1, *([1] * (x.ndim - 1)))
        return x, t, self.target(x0, t, eps_from_x0(x, x0, abar))  # the noise that puts x0 at x

    # --- the flow grid ------------------------------------------------------------------

    def _flow_time(self, index: torch.Tensor, ndim: int) -> torch.Tensor:
        """The flow times of grid indices, shaped to broadcast against a tensor of `ndim` dims.
        float32 before it moves: MPS has no float64."""
        return flow.times(self.T).float().to(index.device)[index].reshape(-1, *([1] * (ndim - 1)))

    def _flow_point(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow sample x_s = c x and its time s, for the VP sample x at grid index t."""
        s = self._flow_time(t, x.ndim)
        return x * _scale(s), s


def _scale(s: torch.Tensor) -> torch.Tensor:
    """c = sqrt((1 - s)² + s²): the flow sample's scale against the variance-preserving one."""
    return ((1 - s) ** 2 + s**2).sqrt()


def of(diffusion) -> Objective:
    """The objective of a `config.DiffusionConfig`."""
    if diffusion.objective == "flow":
        return Objective.flow(diffusion.timesteps, diffusion.time_sampling)
    return Objective.ddpm(make_schedule(diffusion.schedule, diffusion.timesteps), diffusion.prediction)
