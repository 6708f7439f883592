"""How well a model knows its classes, read from the model itself: the diffusion model as
a classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier",
eq. 3 with one noise level). Noise a training image, run the network once per candidate
label on the same noisy image, and pick the label whose prediction misses its target
least. Where the label steers the network, its own label wins; where it does not, the
pick is a guess, and guidance has to do the steering at sampling time (spec.default_guidance).

Measured by `diffcli train` on 256 of its training images at t = 701 of the cosine
schedule, 10-way (docs/results.md, "What the model knows of its labels"): MNIST 0.88 after
2,000 steps and 0.89 after 10 CPU-minutes, shapes 0.99-1.0, CIFAR-10 0.25, 0.33 and 0.39
after 2,000 steps, 10 and 30 minutes, where CIFAR-10 wants far more guidance than the
digits and shapes at the same count of images seen.

The label's gain is the second reading (`label_gain`): how much of the network's error at the
same noise level its own label takes away, against the "no label" it was also trained on.
Knowledge asks whether the label is told apart, the gain how much it changes the picture. They
part where classes look alike but differ in a large share of their pixels (Fashion-MNIST's four
tops: knowledge 0.53, gain 0.038), and where classes are told apart by a small share
(CIFAR-10's airplanes and frogs: 0.70, 0.010). Photos need guidance for longer only where both are
low (docs/results.md, "A second reading").
"""

from __future__ import annotations

import torch

from diffcli.schedules import Schedule

# The noise level it is read at: SNR 0.25 (σ twice the signal; t = 701 of the cosine
# schedule). With less noise the picture gives the class away, the label barely matters,
# and the pick is near chance even for a model that knows its digits (share right, 200 test
# images: MNIST 0.50 at t = 300 against 0.92 at 700); with more, every model guesses more.
SNR = 0.25
WAYS = 10  # candidate labels per image (its own and up to 9 others): chance is 1/WAYS for any class count
IMAGES, DRAWS = 256, 2  # 5,120 forward passes of `small`: 3.4 s on 2 CPU cores (2-core Intel Xeon), 4% of 1,000 steps
# The gain is a sum over images led by a few: on 256 images Fashion-MNIST's tops read 0.028-0.046
# over three picks, on 1,024 0.034-0.039 (4,096 passes: 1.9 s beside the knowledge's 2.6 s for CIFAR-10's
# `small` on the 2-core AMD EPYC, together 6% of 1,000 steps).
GAIN_IMAGES = 1024
BATCH = 256  # forward passes at once


def snr_step(schedule: Schedule) -> int:
    """The timestep whose signal-to-noise ratio is nearest SNR, for any schedule."""
    abar = schedule.alphas_cumprod.double()
    return int(((abar / (1 - abar)).log() - torch.tensor(SNR).double().log()).abs().argmin())


def candidates(labels: torch.Tensor, num_classes: int, gen: torch.Generator, ways: int = WAYS) -> torch.Tensor:
    """(n, w) labels to try for each image, its own first: all classes when there are at most
    `ways` of them, else `ways` - 1 others drawn without replacement."""
    n, w = len(labels), min(num_classes, ways)
    others = torch.rand(n, num_classes, generator=gen).scatter(1, labels[:, None], 2.0).argsort(1)[:, :w - 1]
    return torch.cat([labels[:, None], others], 1)


@torch.no_grad()
def label_knowledge(network, objective, x0: torch.Tensor, labels: torch.Tensor,
                    num_classes: int, gen: torch.Generator, draws: int = DRAWS, step: int | None = None,
                    ways: int = WAYS) -> float:
    """Accuracy of the own-label pick at grid index `step` of the objective's schedule
    (None: snr_step), rescaled so that chance is 0 and always right is 1. `x0` in model
    range [-1, 1] on the network's device; ties count as misses."""
    tries = candidates(labels.cpu(), num_classes, gen, ways)
    err = _errors(network, objective, x0, tries, gen, draws, step)
    w = tries.shape[1]
    right = (err[:, 0] < err[:, 1:].min(1).values).float().mean().item()
    return max(0.0, (right - 1 / w) / (1 - 1 / w))


@torch.no_grad()
def label_gain(network, objective, x0: torch.Tensor, labels: torch.Tensor, null_label: int,
               gen: torch.Generator, draws: int = DRAWS, step: int | None = None) -> float:
    """1 - (the network's error with each image's own label) / (its error with `null_label`),
    each summed over the images, at grid index `step` (None: snr_step). 0 where the label changes
    nothing; the ratio is the same in x0, ε, v or velocity units, since at one noise level each
    error is a fixed multiple of the others."""
    tries = torch.stack([labels.cpu(), torch.full_like(labels.cpu(), null_label)], 1)
    err = _errors(network, objective, x0, tries, gen, draws, step).sum(0)
    return 1 - err[0].item() / err[1].item() if err[1] > 0 else 0.0  # no error to take away: nothing gained


def _errors(network, objective, x0: torch.Tensor, tries: torch.Tensor, gen: torch.Generator, draws: int,
            step: int | None) -> torch.Tensor:
    """(n, w): the network's mean squared error on image i noised to grid index `step` with
    label tries[i, j], summed over `draws` noises (each image's noise shared by its labels).
    Noised a chunk of images at a time, so memory follows BATCH, not n; the noise is drawn in
    the same order as all at once."""
    n, w = tries.shape
    per = max(1, BATCH // w)  # images a forward pass of at most BATCH
    index = torch.full((n,), snr_step(objective.schedule) if step is None else step, device=x0.device)
    t = objective.grid_times(index)  # in the units the network was trained with
    err = torch.zeros(n, w)
    for _ in range(draws):  # the errors summed over draws: one draw alone leaves the pick mostly to its noise
        for i in range(0, n, per):
            x, ti = x0[i:i + per], t[i:i + per]
            noise = torch.randn(x.shape, generator=gen).to(x)
            x_t, time = objective.inputs(x, ti, noise)
            target = objective.target(x, ti, noise).repeat_interleave(w, 0)
            out = network(x_t.repeat_interleave(w, 0), time.repeat_interleave(w, 0), tries[i:i + per].flatten().to(x.device))
            err[i:i + per] += (out.float() - target).square().flatten(1).mean(1).view(-1, w).cpu()
    return err
