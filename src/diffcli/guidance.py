"""Guidance rules: how a sampler mixes the network's conditional output with a reference.

Pure functions of network-like callables `(x_t, t, y) -> output`, as in `samplers`: the
classic classifier-free rule (Ho & Salimans 2022), limited to an interval of noise levels
(Kynkäänniemi et al. 2024) and/or against a worse model (autoguidance, Karras et al. 2024).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from diffcli.samplers import Network
from diffcli.schedules import Schedule

Active = Callable[[torch.Tensor], torch.Tensor]  # (B,) timesteps -> (B,) bool: guide these rows


def guided(network: Network, scale: float, null_label: int, active: Optional[Active] = None,
           weak: Optional[Network] = None) -> Network:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = out(x, ∅) + w (out(x, y) - out(x, ∅)).

    Applied to the raw network output: ε, v and x̂0 are all affine in it for a fixed x_t,
    so guiding the output is the same as guiding ε. w = 1 is the plain conditional model
    and w = 0 the unconditional one, each one forward pass; any other w is one pass of 2B.

    `active(t)` (B,) bool limits guidance to some timesteps (`interval`); elsewhere the
    output is the conditional one, and a step where no row is guided costs one pass of B.
    `weak` is autoguidance (Karras et al. 2024, eq. 1): guide away from a worse model's
    conditional output instead of the unconditional one, out = weak + w (out - weak).
    """
    if scale == 1.0:
        return network

    def mix(x, t, y):
        if weak is not None:
            return weak(x, t, y).float().lerp(network(x, t, y).float(), scale)
        null = torch.full_like(y, null_label)
        if scale == 0.0:
            return network(x, t, null)
        out = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    if active is None:
        return mix

    def limited(x, t, y):
        on = active(t)
        guided_rows = int(on.sum())  # one host sync a step: the samplers give every row the same t
        if guided_rows == 0:
            return network(x, t, y)
        if guided_rows == len(on):
            return mix(x, t, y)
        return torch.where(on.reshape(-1, *([1] * (x.ndim - 1))), mix(x, t, y), network(x, t, y).float())

    return limited


def interval(schedule: Schedule, low: float, high: float) -> Active:
    """Guidance only where low < σ_t <= high, with σ_t = sqrt((1-ᾱ_t)/ᾱ_t) the noise level of
    the variance-exploding view (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
    Interval", eq. 4): guiding at the highest noise levels draws every sample to the same
    few modes, and at the lowest it only sharpens what is already decided."""
    abar = schedule.alphas_cumprod.double()
    sigma = ((1 - abar) / abar).sqrt()
    inside = (sigma > low) & (sigma <= high)
    return lambda t: inside.to(t.device)[t]
