"""Training a diffusion or flow model: its objective's loss on real images (objective.py),
as a `Task` for the shared loop (`fitting.fit`: AdamW, warm-up, EMA, checkpoints, grids).

Randomness: the run's batch generator (`TrainState.batch_gen`) draws timesteps, noise,
label dropout and flips; each epoch's data order comes from a generator seeded with
(seed, epoch), so it needs no saved state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from diffcli.config import RunConfig
from diffcli.data import ImageData, to_model_range
from diffcli.devices import sampling_autocast, upload
from diffcli.distributed import World, check_batch
from diffcli.fitting import TrainResult, fit
from diffcli.knowledge import GAIN_IMAGES, IMAGES, label_gain, label_knowledge
from diffcli.objective import Objective, of
from diffcli.spec import LabelReading


def batch_inputs(x0: torch.Tensor, labels: torch.Tensor, objective: Objective, null_label: int, label_dropout: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs for one batch: the objective's times, ε ~ N(0, I), and labels replaced
    by the "no label" index with probability `label_dropout` (Ho & Salimans 2022, Alg. 1)."""
    b = x0.shape[0]
    t = objective.draw_times(b, gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < label_dropout
    return t, noise, torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(model, objective: Objective, x0, t, noise, y, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Ho et al. 2020, eq. 14 (L_simple) for ε; the same MSE on v for v-prediction and on the
    velocity for flow matching (Lipman et al. 2023, eq. 23).

    With min_snr_gamma > 0, a ddpm model's timesteps are weighted by Min-SNR-γ (Hang et al.
    2023, `Objective.weights`): it stops the nearly noise-free timesteps from dominating the
    gradient, so the global layout is learned sooner.
    """
    x_t, time = objective.inputs(x0, t, noise)
    per_image = (model(x_t, time, y).float() - objective.target(x0, t, noise)).square().mean(dim=tuple(range(1, x0.ndim)))
    weights = objective.weights(t, min_snr_gamma)
    return (per_image if weights is None else per_image * weights).mean()


def train(cfg: RunConfig, data: ImageData, out: Path, resume: bool = False,
          report: Callable[..., None] = lambda event, **info: None,
          should_stop: Callable[[], bool] = lambda: False,
          world: World = World(), device: torch.device | None = None) -> TrainResult:
    """Train on `data`; with `world.active` (torchrun), each rank takes its contiguous share
    of every global batch, whose random draws all ranks make alike (see `fitting.fit`)."""
    return fit(cfg, lambda device, layout: Batches(data, cfg, world, device, layout), out, resume, report, should_stop,
               world, device)


class Batches:
    """The task of learning to denoise `data`: the global batch for each step, this rank's
    share of it on the device, and `diffusion_loss` on it. Images stay uint8 on the device
    (decoded once, no loader in the loop)."""

    def __init__(self, data: ImageData, cfg: RunConfig, world: World, device: torch.device, layout: torch.memory_format):
        n = data.images.shape[0]
        self.size = min(cfg.train.batch_size, n)  # the global batch: all ranks together
        local = check_batch(world, self.size)
        self.mine = slice(world.rank * local, (world.rank + 1) * local)
        self.local_shape = (local, *data.images.shape[1:])
        self.per_epoch = n // self.size  # drop the ragged last batch: every step sees `size` images
        self.images, self.labels = data.images.to(device), data.labels
        self.device, self.layout, self.seed = device, layout, cfg.train.seed
        self.null, self.flip = cfg.model.num_classes, bool(cfg.data.flip)
        self.label_dropout = cfg.train.label_dropout if self.null else 0.0
        self.class_names = data.class_names
        self.objective, self.min_snr_gamma = of(cfg.diffusion), cfg.train.min_snr_gamma
        self._order, self._epoch = None, -1

    def loss(self, model, batch: tuple) -> torch.Tensor:
        return diffusion_loss(model, self.objective, *batch, self.min_snr_gamma)

    def label_reading(self, model) -> LabelReading | None:
        """The model's label knowledge and gain on the same training images each time
        (knowledge.py; the knowledge on the first IMAGES of the gain's); None without two
        classes to tell apart."""
        if self.null < 2:
            return None
        gen = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(len(self.labels), generator=gen)[:max(IMAGES, GAIN_IMAGES)]
        x0 = to_model_range(self.images[upload(pick, self.device)]).contiguous(memory_format=self.layout)
        y = self.labels[pick]
        with sampling_autocast(self.device):
            return LabelReading(label_knowledge(model, self.objective, x0[:IMAGES], y[:IMAGES], self.null, gen),
                                label_gain(model, self.objective, x0[:GAIN_IMAGES], y[:GAIN_IMAGES], self.null, gen))

    def dry_batch(self) -> tuple:
        """Zeros shaped like `get`'s, for compiling. t and y must be separate tensors: one for
        both makes dynamo guard on `t is y`, and the first real step would compile it all again."""
        x = torch.zeros(self.local_shape, device=self.device).contiguous(memory_format=self.layout)
        n = self.local_shape[0]
        t = torch.zeros(n, dtype=self.objective.time_dtype, device=self.device)
        return x, t, torch.zeros_like(x), torch.zeros(n, dtype=torch.long, device=self.device)

    def get(self, step: int, gen: torch.Generator) -> tuple:
        """(x0, t, noise, y) for this rank; every draw is made for the whole global batch."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63))
            self._epoch = epoch
        idx = self._order[pos * self.size:(pos + 1) * self.size]
        x0 = to_model_range(self.images[upload(idx, self.device)]).contiguous(memory_format=self.layout)
        t, noise, y = batch_inputs(x0, self.labels[idx], self.objective, self.null, self.label_dropout, gen)
        if self.flip:
            mirrored = upload(torch.rand(self.size, generator=gen) < 0.5, self.device)
            x0 = torch.where(mirrored[:, None, None, None], x0.flip(-1), x0)
        m, dev = self.mine, self.device
        return x0[m], upload(t[m], dev), upload(noise[m], dev), upload(y[m], dev)
