"""Distillation (`diffcli distill`): a student that draws in `steps` network evaluations
what its teacher draws with many guided DDIM steps.

The recipe is one phase of progressive distillation taken straight to the target step
count (Salimans & Ho 2022, Alg. 2, with a single phase as in TRACT, Berthelot et al.
2023), with classifier-free guidance folded in (Meng et al. 2023, stage one): the
student is the conditional network alone, one pass per step. It is data-free: each
batch follows the teacher's own guided DDIM path from pure noise, so the student learns
on the very states it meets when sampling. For each of the student's trailing timesteps
t (next one s), the path at t is the input and the x̂0 that takes one DDIM step from
there to where the teacher's `teacher_steps / steps` finer steps arrived at s is the
target (`samplers.ddim_x0_for`). The student starts from the teacher's EMA weights.

The loop, checkpoints, resume and torchrun are `fitting.fit`'s; the batches are `Pairs`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from diffcli import samplers
from diffcli.checkpoint import load_model, model_header, model_metadata, trained_sha256, training
from diffcli.config import DistillConfig, RunConfig, TrainConfig, apply_overrides, from_dict
from diffcli.devices import pick_device, upload
from diffcli.distributed import World, check_batch
from diffcli.errors import UserError
from diffcli.fitting import TrainResult, fit
from diffcli.generate import denoiser
from diffcli.objective import Objective, of
from diffcli.schedules import Schedule
from diffcli.spec import Trained, default_guidance

# The optimiser settings of a distillation run (its `train` section), where they differ
# from training's: the student starts from a trained model, so a learning rate 4x lower
# than training's small preset, and a shorter EMA for a run of a few thousand steps.
TRAIN_DEFAULTS = dict(lr=5e-4, warmup_steps=50, ema_decay=0.995, label_dropout=0.0, min_snr_gamma=0.0, sample_every=250)
DEFAULT_MAX_STEPS = 1000  # with neither --max-steps nor --minutes


def paths_per_step(batch_size: int, steps: int) -> int:
    """Teacher paths a global batch holds: each gives `steps` student pairs, so a batch that
    is not a multiple of the steps is rounded down (at least one path)."""
    return max(1, batch_size // steps)


def plan(T: int, steps: int, teacher_steps: int) -> tuple[list[int], list[int]]:
    """The student's trailing timesteps, and the teacher's: each student interval (down to
    "after the last step", -1) cut into ceil(teacher_steps / steps) even DDIM steps, so the
    teacher's path passes through every student timestep."""
    student = samplers.timesteps(T, steps)
    per = math.ceil(teacher_steps / steps)
    fine: list[int] = []
    for t, s in zip(student, student[1:] + [-1]):
        cut = torch.linspace(t, s, per + 1, dtype=torch.float64).round().long().tolist()
        fine += [v for v in dict.fromkeys(cut) if v > s]  # an interval shorter than `per` visits each timestep once
    return student, fine


def teacher_path(denoise: samplers.Denoiser, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor,
                 student: list[int], teacher: list[int], clip: bool = True) -> list[torch.Tensor]:
    """The teacher's deterministic DDIM path from `noise` on its timesteps `teacher`: the
    states at each of the `student` timesteps, then the image it ends on."""
    kept: dict[int, torch.Tensor] = {}

    def keep(i, t, x, x0):
        if t in student:
            kept[t] = x

    final = samplers.ddim(denoise, schedule, noise, labels, teacher, clip_x0=clip, callback=keep)
    return [kept[t] for t in student] + [final]


def pairs(schedule: Schedule, states: list[torch.Tensor], student: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target x̂0) for every student step of every path, step by step."""
    ends = student[1:] + [-1]
    targets = [samplers.ddim_x0_for(schedule, states[k], states[k + 1], t, s) for k, (t, s) in enumerate(zip(student, ends))]
    t = torch.tensor(student, device=states[0].device).repeat_interleave(states[0].shape[0])
    return torch.cat(states[:-1]), t, torch.cat(targets)


def distill_loss(model, objective: Objective, x_t, t, y, target) -> torch.Tensor:
    """The MSE on what the network predicts, with the target x̂0 put in those terms (ε, v
    or a flow's velocity at this x_t: `Objective.distill_target`). For v this is (1 + SNR_t) |x̂0 - x̃|²,
    Salimans & Ho's "SNR+1" weighting, which keeps the noisiest step, where x̂0 is hardest, in the loss."""
    x, time, wanted = objective.distill_target(x_t, t, target)
    return (model(x, time, y).float() - wanted).square().mean()


class Pairs:
    """The task: each global batch is `size // steps` teacher paths from fresh noise and
    random labels (every rank draws them all, then follows its share), as `steps` pairs each."""

    def __init__(self, teacher: torch.nn.Module, class_names: list[str], cfg: RunConfig, world: World,
                 device: torch.device, layout: torch.memory_format):
        d, m = cfg.distill, cfg.model
        self.objective = of(cfg.diffusion)
        self.schedule, self.steps, self.class_names = self.objective.schedule, d.steps, class_names
        self.student, self.fine = plan(self.schedule.T, d.steps, d.teacher_steps)
        self.paths = paths_per_step(cfg.train.batch_size, d.steps)
        self.size, self.per_epoch = self.paths * d.steps, None  # no data, so no epochs
        local = check_batch(world, self.paths)
        self.mine = slice(world.rank * local, (world.rank + 1) * local)
        self.shape = (self.paths, m.in_channels, m.image_size, m.image_size)
        self.num_classes, self.device, self.layout = m.num_classes, device, layout
        self.teacher = denoiser(teacher, self.objective, d.student().guidance)

    def get(self, step: int, gen: torch.Generator) -> tuple:
        noise = torch.randn(self.shape, generator=gen)
        k = self.num_classes  # an unconditional model has only the "no label" index, 0
        y = torch.randint(0, k, (self.paths,), generator=gen) if k else torch.zeros(self.paths, dtype=torch.long)
        noise, y = upload(noise[self.mine], self.device), upload(y[self.mine], self.device)
        with torch.no_grad():
            states = teacher_path(self.teacher, self.schedule, noise, y, self.student, self.fine)
        x_t, t, target = pairs(self.schedule, states, self.student)
        return x_t.contiguous(memory_format=self.layout), t, y.repeat(self.steps), target

    def loss(self, model, batch: tuple) -> torch.Tensor:
        return distill_loss(model, self.objective, *batch)

    def label_reading(self, model) -> None:  # a student samples with its guidance folded in: the rule does not apply
        return None

    def dry_batch(self) -> tuple:
        n = (self.mine.stop - self.mine.start) * self.steps
        x = torch.zeros((n, *self.shape[1:]), device=self.device).contiguous(memory_format=self.layout)
        t, y = (torch.zeros(n, dtype=torch.long, device=self.device) for _ in range(2))  # two tensors: see training
        return x, t, y, torch.zeros_like(x)


# --- the run ------------------------------------------------------------------------

def teacher_config(path: Path) -> tuple[RunConfig, list[str], Trained]:
    """The config, class names and training (for the guidance rule) of the model at `path`, refused in
    one sentence when it is not a diffcli model or is itself distilled."""
    try:
        meta = model_metadata(model_header(path))
    except UserError as e:
        raise UserError(f"--teacher: {e}") from None
    cfg = from_dict(meta["config"])
    if cfg.distill is not None:
        raise UserError(f"--teacher '{path}' is itself a distilled student; distil from the model `diffcli train` made "
                        f"({cfg.distill.teacher}).")
    return cfg, meta["class_names"], training(cfg, meta)


def configure(teacher: Path, d: dict, train: dict) -> RunConfig:
    """The run's config: the teacher's network and schedule, training settings for
    distillation (TRAIN_DEFAULTS < `train`), and the `distill` section from `d`; each
    value type-checked as a config file's would be."""
    cfg, _, trained = teacher_config(teacher)
    if cfg.model.num_classes == 0 and d.get("guidance") not in (None, 1.0):
        raise UserError("the teacher was trained without classes, so it has no guidance to distil; drop --guidance.")
    keep = {k: getattr(cfg.train, k) for k in ("preset", "grad_clip", "batch_size")}  # the teacher's, for its size
    cfg.train = TrainConfig(**keep, **TRAIN_DEFAULTS)
    cfg.distill = DistillConfig(teacher=str(teacher.resolve()), teacher_sha256=trained_sha256(teacher.read_bytes()))
    apply_overrides(cfg, {"train": train, "distill": d})
    if not 1 <= cfg.distill.steps < cfg.diffusion.timesteps:
        raise UserError(f"--steps (distill.steps) must be between 1 and {cfg.diffusion.timesteps - 1}, below the teacher's "
                        f"T={cfg.diffusion.timesteps}; got {cfg.distill.steps}.")
    if not (cfg.train.max_steps or cfg.train.minutes):
        cfg.train.max_steps = DEFAULT_MAX_STEPS
    cfg.train.epochs = None  # no data, no epochs
    if cfg.distill.guidance is None:
        cfg.distill.guidance = default_guidance(trained) if cfg.model.num_classes else 1.0  # as `sample` would guide it
    return cfg


def distill(cfg: RunConfig, out: Path, resume: bool = False, report: Callable[..., None] = lambda event, **info: None,
            should_stop: Callable[[], bool] = lambda: False, world: World = World(),
            device: torch.device | None = None) -> TrainResult:
    """Distil `cfg.distill.teacher` into the student `cfg` describes, in the run folder `out`."""
    d = cfg.distill
    device = device or pick_device(cfg.train.device)
    path = Path(d.teacher)
    if not path.is_file():
        raise UserError(f"the teacher '{path}' of this distillation is gone; put it back to continue.")
    if trained_sha256(path.read_bytes()) != d.teacher_sha256:  # (a tuned guidance weight changes only the header)
        raise UserError(f"the teacher '{path}' has changed since this distillation began (its SHA-256 differs); "
                        f"distil the new teacher into a new --out folder.")
    teacher, _, meta = load_model(path, device)
    teacher.requires_grad_(False)

    def start(state) -> None:
        for module in (state.net, state.ema):
            module.load_state_dict(teacher.state_dict())

    return fit(cfg, lambda dev, layout: Pairs(teacher, meta["class_names"], cfg, world, dev, layout), out, resume,
               report, should_stop, world, device, start)
