"""Turn a trained U-Net into pictures: per-image seeds, guidance, batching.

The glue between the network (unet.py) and the pure samplers (samplers.py), used by
`diffcli sample` and by the sample grids written during training.
"""

from __future__ import annotations

import logging

import torch

from diffcli import samplers
from diffcli.data import from_model_range
from diffcli.devices import sampling_autocast, timed
from diffcli.distributed import World, gather_shares, share
from diffcli.errors import UserError
from diffcli.guidance import guided, interval as guidance_interval
from diffcli.objective import Objective
from diffcli.spec import SamplerSpec

log = logging.getLogger("diffcli")

# The most pixels one command draws: every image is held in memory until the end (and `sample`'s
# grid holds them again). 2^30 is a 32k x 32k grid, 3.2 GB of RGB bytes: 1M images of 32 px, 65k
# of 128 px, an FID's 50k at 128 px. Past it a typo's --n ran out of memory or ran for days.
MAX_PIXELS = 2**30


def check_count(images: int, size: int, advice: str = "draw them in parts, each with its own --seed") -> None:
    """Refuse, before any list is built, a request for more images than one command holds."""
    if images * size * size > MAX_PIXELS:
        raise UserError(f"--n asks for {images:,} images of {size} px, more than one command holds in memory "
                        f"({MAX_PIXELS // (size * size):,} at this size); {advice}.")


def sampling_network(model: torch.nn.Module, objective: Objective) -> samplers.Network:
    """The model under sampling autocast, seen through its objective: (x, grid index, y) -> ε or v."""
    device = next(model.parameters()).device

    def run(x, t, y):
        with sampling_autocast(device):
            return model(x, t, y)

    return objective.network(run)


def denoiser(model: torch.nn.Module, objective: Objective, guidance: float,
             interval: tuple[float, float] | None = None) -> samplers.Denoiser:
    """The model as the samplers see it: guided at weight `guidance` when it has classes
    (only for noise levels in `interval`, if given), returning (ε̂, x̂0)."""
    net = sampling_network(model, objective)
    if model.cfg.num_classes > 0:
        active = None if interval is None else guidance_interval(objective.schedule, *interval)
        net = guided(net, guidance, model.cfg.num_classes, active)
    return samplers.predictions(net, objective.schedule, objective.prediction)


def per_batch(model: torch.nn.Module, seeds: list[int], batch_size: int, run, world: World = World()) -> torch.Tensor:
    """uint8 images from `run(chunk, randn_like)` (a model-range batch) over slices of
    `seeds`, each image drawing from its own generator, so batching changes nothing.
    Under torchrun each rank makes its `share` of the images and all of them come back
    to every rank: image i is the same picture with any number of processes."""
    device = next(model.parameters()).device
    mine = share(world, len(seeds))
    out = [torch.empty(0, dtype=torch.uint8)]  # a rank with no share still has a tensor to send
    broken = 0
    for start in range(mine.start, mine.stop, batch_size):
        chunk = slice(start, min(start + batch_size, mine.stop))
        x = run(chunk, samplers.PerImageNoise(seeds[chunk], device))
        broken += int((~torch.isfinite(x)).flatten(1).any(1).sum())  # they would come out black, without a word
        out.append(from_model_range(x).cpu())
    if broken:
        log.warning("%d of %d images hold NaN or infinite values (drawn black): the model's weights or this sampling "
                    "diverged", broken, len(range(mine.start, mine.stop)))
    return gather_shares(world, torch.cat(out), len(seeds))


@torch.no_grad()
def generate(model: torch.nn.Module, objective: Objective, spec: SamplerSpec, *,
             labels: list[int], seeds: list[int], batch_size: int = 64, callback=None, world: World = World()) -> torch.Tensor:
    """Images (N, C, H, W) uint8, image i made from seed seeds[i] and label labels[i].

    `labels` may hold the model's "no label" index (num_classes) for unconditional
    images. Results do not depend on `batch_size` (each image owns its generator).
    `callback(first_image, step, t, x_t, x0_hat)` sees every step of every batch (of this
    rank's share, under torchrun: `world`).
    """
    schedule = objective.schedule
    spec = spec.resolve(schedule.T, model.student, model.trained)
    cfg = model.cfg
    denoise = denoiser(model, objective, spec.guidance, spec.interval)

    def run(chunk: slice, randn_like) -> torch.Tensor:
        device = randn_like.device
        noise = randn_like(torch.empty(len(seeds[chunk]), cfg.in_channels, cfg.image_size, cfg.image_size, device=device))
        y = torch.tensor(labels[chunk], device=device, dtype=torch.long)
        cb = None if callback is None else (lambda i, t, x, x0: callback(chunk.start, i, t, x, x0))
        return samplers.sample(spec, denoise, schedule, noise, y, randn_like, cb)

    return per_batch(model, seeds, batch_size, run, world)


def compiled_for_sampling(model: torch.nn.Module, objective: Objective, spec: SamplerSpec, *,
                          labels: list[int], seeds: list[int], batch_size: int, report) -> torch.nn.Module:
    """`model` under torch.compile, checked with one DDIM step of the first batch (the shapes
    sampling will use), or `model` itself with a notice through `report` when that fails."""
    from diffcli import compiling

    first = slice(0, min(batch_size, len(seeds)))
    spec = spec.resolve(objective.T, model.student, model.trained)
    short = spec if model.student else SamplerSpec("ddim", 1, spec.guidance)  # a student runs only its few steps
    check = lambda fast: generate(fast, objective, short, labels=labels[first], seeds=seeds[first],  # noqa: E731
                                  batch_size=batch_size)
    return compiling.compiled(model, check, report, next(model.parameters()).device)


class Trajectory:
    """A `generate` callback that keeps x_t and x̂0 at `frames` evenly spaced steps.

    After sampling: `steps` (the step indices kept), `timesteps` (their t), and
    `xt`, `x0` as uint8 tensors (frames, N, C, H, W) in image order.
    """

    def __init__(self, total_steps: int, frames: int):
        from diffcli.preview import even_steps

        self.keep = set(even_steps(total_steps, min(frames, total_steps)))
        self._xt: dict[int, list] = {}
        self._x0: dict[int, list] = {}
        self._t: dict[int, int] = {}

    def __call__(self, start: int, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i in self.keep:  # chunks arrive in image order, so appending keeps that order
            self._xt.setdefault(i, []).append(from_model_range(x).cpu())
            self._x0.setdefault(i, []).append(from_model_range(x0).cpu())
            self._t[i] = t

    @property
    def steps(self) -> list[int]:
        return sorted(self._xt)

    @property
    def timesteps(self) -> list[int]:
        return [self._t[i] for i in self.steps]

    @property
    def xt(self) -> torch.Tensor:
        return torch.stack([torch.cat(self._xt[i]) for i in self.steps])

    @property
    def x0(self) -> torch.Tensor:
        return torch.stack([torch.cat(self._x0[i]) for i in self.steps])


def sweep(model: torch.nn.Module, objective: Objective, specs: list[SamplerSpec], *,
          label: int, seeds: list[int]) -> list[tuple[torch.Tensor, float]]:
    """Sample the same seeds (so the same starting noise) once per spec; returns (images,
    seconds) for each, timed with the device synchronised."""
    device = next(model.parameters()).device
    return [timed(lambda s=spec: generate(model, objective, s, labels=[label] * len(seeds), seeds=seeds), device)
            for spec in specs]
