"""The optimisation loop every run shares: AdamW, warm-up, EMA, checkpoints, grids, the
time budget, Ctrl-C, NaN watch, DDP and torch.compile.

`fit()` prints nothing; it reports through `report(event, **info)` so the CLI can draw a
progress bar (events: "start", "step", "log", "checkpoint", "grid", "loss_curve",
"notice", "done"). What is learned comes in as a `Task`: `training.Batches` (denoising
real images) and `distill.Pairs` (matching a teacher's sampler) are the two.

Randomness: one CPU generator (`TrainState.batch_gen`) makes every draw of a task's
batches; its state is saved with the training state, so a resumed run continues the same
random sequence.

`fit()` reads top to bottom; the stopping rule (`Limits`), the metrics line (`Meter`) and
the NaN watch (`trainstate.NonFiniteGuard`) are named helpers below it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from diffcli import compiling, posthoc
from diffcli.config import RunConfig, TrainConfig, save_yaml
from diffcli.devices import autocast, memory_format, pick_device, precision_for
from diffcli.distributed import World, any_rank, barrier, mean_over_ranks
from diffcli.errors import UserError
from diffcli.files import save_image
from diffcli.generate import generate
from diffcli.images import grid
from diffcli.runs import METRICS_FILE, MODEL_FILE, append_metrics, check_free_space, truncate_metrics
from diffcli.objective import of
from diffcli.spec import LabelReading, SamplerSpec, Trained, default_guidance, knowledge_can_matter
from diffcli.trackers import tracking
from diffcli.trainstate import NonFiniteGuard, TrainState

LOG_EVERY = 50  # steps between metrics lines and non-finite checks (the only host syncs)
STOP_CHECK_EVERY = 10  # steps between the ranks' vote on stopping (time budget, Ctrl-C)
DEFAULT_EPOCHS = 10  # when no stopping rule is given
GRID_COLUMNS = 8
GRID_MAX_ROWS = 10


class Task(Protocol):
    """What a run learns: batches drawn with the run's generator, and the loss on them."""
    size: int  # the global batch: all ranks together
    per_epoch: int | None  # steps per pass over the data; None where there is no data (distillation)
    class_names: list[str]

    def get(self, step: int, gen: torch.Generator) -> tuple: ...  # this rank's share of batch `step`
    def loss(self, model, batch: tuple) -> torch.Tensor: ...
    def dry_batch(self) -> tuple: ...  # zeros shaped like `get`'s, for compiling
    def label_reading(self, model) -> LabelReading | None: ...  # knowledge.py's two readings on the data; None: not measurable


@dataclass
class TrainResult:
    step: int
    epoch: float
    model_path: Path
    grid_path: Path | None
    stopped_by: str  # "steps", "epochs", "minutes" or "interrupt"


def lr_at(step: int, cfg, progress: float) -> float:
    """Linear warm-up, then constant or cosine decay; `progress` in [0, 1] is the share of the run done."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if cfg.lr_schedule == "cosine" else 1.0
    return cfg.lr * warm * decay


def grid_spec(cfg: RunConfig, trained: Trained) -> SamplerSpec:
    """How the grids are drawn: a distilled student as it was made to be sampled; a
    trained model with cheap DDIM (`train.grid_steps`), good enough to judge progress, at
    the guidance `sample` would use for the model saved with this training."""
    if cfg.distill is not None:
        return SamplerSpec().resolve(cfg.diffusion.timesteps, cfg.distill.student())
    return SamplerSpec("ddim", cfg.train.grid_steps, default_guidance(trained))


def sample_grid(ema, cfg: RunConfig, class_names: list[str], path: Path, seed: int, trained: Trained) -> Path:
    """One row per class (up to GRID_MAX_ROWS), same seeds in every row (`grid_spec`)."""
    rows = list(range(min(len(class_names), GRID_MAX_ROWS))) or [cfg.model.num_classes]  # unconditional: null
    labels = [r for r in rows for _ in range(GRID_COLUMNS)]
    seeds = [seed + i for _ in rows for i in range(GRID_COLUMNS)]
    images = generate(ema, of(cfg.diffusion), grid_spec(cfg, trained), labels=labels, seeds=seeds)
    return save_image(grid(images, GRID_COLUMNS), path)


# --- the loop ------------------------------------------------------------------

def fit(cfg: RunConfig, make_task: Callable[[torch.device, torch.memory_format], Task], out: Path, resume: bool = False,
        report: Callable[..., None] = lambda event, **info: None, should_stop: Callable[[], bool] = lambda: False,
        world: World = World(), device: torch.device | None = None,
        start: Callable[[TrainState], None] = lambda state: None) -> TrainResult:
    """Optimise `make_task(device, layout)`'s loss; `start(state)` sets the first weights
    of a new run (a resumed one loads its own). With `world.active` (torchrun), every rank
    runs this with the same seed and takes its share of each global batch, DDP averages
    the gradients, and only rank 0 writes files: N processes follow one process's
    trajectory step for step."""
    tc = cfg.train
    device = device or pick_device(tc.device)
    torch.manual_seed(tc.seed)  # initial weights, and dropout inside the network, use the global generator
    layout = memory_format(device, _precision(cfg, device))
    state = TrainState.create(cfg, device, layout)
    if resume:
        state.load(out)
    else:
        start(state)
    if world.is_main:  # the metrics and snapshots after the checkpoint resumed from; all of them when starting over
        truncate_metrics(out, state.step)
        posthoc.truncate(out, state.step)
        save_yaml(cfg, out / "config.yaml")
    task = make_task(device, layout)
    limits = Limits(tc, task.per_epoch)
    params = sum(p.numel() for p in state.net.parameters())
    report("start", device=device, precision=_precision(cfg, device), preset=tc.preset, steps_per_epoch=task.per_epoch,
           total_steps=limits.total_steps, batch=task.size, budget_s=limits.budget_s, step=state.step, params=params,
           world=world.size, objective=of(cfg.diffusion).describe())
    if world.is_main:
        check_free_space(out, params, len(state.profiles))
    model = _prepared(state.net, cfg, task, world, device, report)
    with tracking(cfg, out, state.step, resume, world, report) as report:  # rank 0 logs to the trackers asked for
        return _loop(cfg, task, state, model, limits, out, report, should_stop, world, device)


def _loop(cfg: RunConfig, task: Task, state: TrainState, model, limits: Limits, out: Path, report, should_stop,
          world: World, device: torch.device) -> TrainResult:
    """Step until `limits` says stop; log, check and checkpoint between steps."""
    tc = cfg.train
    guard = NonFiniteGuard(tc.on_nonfinite, device)
    limits.start_clock()
    meter = Meter(out, task, world, report, state.step, limits.started)
    grid_path = None
    while (stopped_by := limits.reached(state.step, world, should_stop, device)) is None:
        lr = lr_at(state.step, tc, limits.progress(state.step)) * guard.lr_scale
        loss = _optimizer_step(model, state, cfg, task, lr, task.get(state.step, state.batch_gen), device)
        state.step += 1
        meter.add(loss, lr)
        guard.watch(loss, state.step)
        report("step", step=state.step)
        ema_snapshot_due = bool(state.profiles) and state.step % tc.ema_snapshot_every == 0
        if state.step % LOG_EVERY and state.step % tc.sample_every and not ema_snapshot_due:
            continue  # bookkeeping (the only host syncs) every LOG_EVERY, sample_every and ema_snapshot_every steps
        if guard.check(state, out, report, world):  # rolled back to the last good state
            meter.restart(state.step)
            continue
        if state.step % LOG_EVERY == 0:
            meter.log(state.step)
        if ema_snapshot_due and world.is_main and state.step % tc.sample_every:  # a checkpoint saves one anyway
            _save_ema_snapshot(out, state)
        if state.step % tc.sample_every == 0 and world.is_main:
            paused = time.monotonic()
            grid_path = _checkpoint(out, cfg, state, task, report)
            meter.skip(time.monotonic() - paused)  # keep images/s about training, not sampling

    guard.check(state, out, report, world, final=True)
    meter.log(state.step)  # the tail since the last full interval, so short runs log too
    if state.step > 0 and world.is_main and state.step % tc.sample_every:
        grid_path = _checkpoint(out, cfg, state, task, report, final=True)
    elif state.step > 0 and world.is_main and not _doubled(state.step // tc.sample_every):
        _measure_and_save(out, cfg, state, task, report)  # the checkpoint was just taken; only its reading is missing
    barrier(world)  # nobody leaves before rank 0 has written the last checkpoint
    report("done", step=state.step, stopped_by=stopped_by)
    return TrainResult(state.step, epochs(state.step, task), out / MODEL_FILE, grid_path, stopped_by)


def epochs(step: int, task: Task) -> float:
    return step / task.per_epoch if task.per_epoch else 0.0


def _optimizer_step(model, state: TrainState, cfg: RunConfig, task: Task, lr: float, batch: tuple,
                    device: torch.device) -> torch.Tensor:
    """One AdamW step on the task's loss and the EMA update; the loss, on the device."""
    tc = cfg.train
    for group in state.opt.param_groups:
        group["lr"] = lr
    with autocast(device, _precision(cfg, device)):
        loss = task.loss(model, batch)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    state.opt.step()
    state.average(tc.ema_decay)
    return loss.detach()


class Limits:
    """When to stop: `max_steps`, `epochs` (DEFAULT_EPOCHS when nothing is set) or the
    `minutes` budget, whichever comes first; and how far the run is, for the LR decay.
    Without data (`per_epoch` None) there are no epochs: a step or time limit must be set."""

    def __init__(self, tc: TrainConfig, per_epoch: int | None):
        epochs = tc.epochs or (DEFAULT_EPOCHS if not (tc.max_steps or tc.minutes) else math.inf)
        limit = min(tc.max_steps or math.inf, epochs * per_epoch if per_epoch else math.inf)
        self.total_steps = math.ceil(limit) if limit < math.inf else None
        self.by_steps = self.total_steps == tc.max_steps
        self.budget_s = tc.minutes * 60 if tc.minutes else None
        self.started = time.monotonic()

    def start_clock(self) -> None:
        self.started = time.monotonic()  # after compiling: the budget is for training

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self, step: int) -> float:
        by_steps = step / self.total_steps if self.total_steps else 0.0
        return max(by_steps, self.elapsed() / self.budget_s if self.budget_s else 0.0)

    def reached(self, step: int, world: World, should_stop: Callable[[], bool], device: torch.device) -> str | None:
        """Why to stop before `step` ("steps", "epochs", "minutes", "interrupt"), or None.
        Time and Ctrl-C can differ between ranks; they agree every STOP_CHECK_EVERY steps."""
        if self.total_steps is not None and step >= self.total_steps:
            return "steps" if self.by_steps else "epochs"
        if world.active and step % STOP_CHECK_EVERY:
            return None
        if any_rank(world, self.budget_s is not None and self.elapsed() >= self.budget_s, device):
            return "minutes"
        if any_rank(world, should_stop(), device):
            return "interrupt"
        return None


class Meter:
    """The mean loss since the last metrics line, summed on the device (no host sync per
    step), written as one line of metrics.jsonl by `log`."""

    def __init__(self, out: Path, task: Task, world: World, report, step: int, started: float):
        self.out, self.task, self.world, self.report, self.started = out, task, world, report, started
        self.loss_sum, self.lr = None, 0.0
        self.last_step, self.last_t = step, started

    def restart(self, step: int) -> None:
        """After a rollback: the steps since the last line are gone."""
        self.last_step = step
        if self.loss_sum is not None:
            self.loss_sum.zero_()

    def skip(self, seconds: float) -> None:
        """Leave `seconds` (a checkpoint and its grid) out of the next line's images/s."""
        self.last_t += seconds

    def add(self, loss: torch.Tensor, lr: float) -> None:
        self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum.add_(loss)
        self.lr = lr

    def log(self, step: int) -> None:
        """One line, averaged over all ranks, for the steps since the last (none: no line)."""
        steps, now = step - self.last_step, time.monotonic()  # the clock before the sync below
        if steps <= 0:
            return
        mean_loss = mean_over_ranks(self.world, self.loss_sum / steps).item()
        self.loss_sum.zero_()
        record = {"step": step, **({"epoch": round(epochs(step, self.task), 4)} if self.task.per_epoch else {}),
                  "loss": mean_loss, "lr": self.lr, "images_per_s": self.task.size * steps / max(now - self.last_t, 1e-9),
                  "elapsed_s": now - self.started}
        self.last_step, self.last_t = step, now
        if self.world.is_main:
            append_metrics(self.out, record)
            self.report("log", **record)


def _precision(cfg: RunConfig, device: torch.device) -> str:
    """"bf16" or "fp32": the run's --precision on this device, for its network's width."""
    return precision_for(device, cfg.train.precision, cfg.model.base_channels)


def _prepared(net, cfg: RunConfig, task: Task, world: World, device: torch.device, report):
    """The module the loop calls: `net` in train mode, under DDP with several ranks, and
    compiled (checked on this run's shapes first) when asked or on CUDA."""
    model = net
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    if not compiling.wanted(cfg.train.compile, device):
        return model
    report("notice", message="compiling the U-Net with torch.compile before the first step "
                             "(a minute or so; --no-compile skips it).")
    # Under DDP the try runs without gradient sync: a backward that fails halfway must not
    # leave the reducer mid-reduction, or the other ranks waiting in an all-reduce.
    quiet = model.no_sync if world.active else contextlib.nullcontext
    return compiling.compiled(model, lambda fast: _dry_step(fast, net, cfg, task, device, quiet), report, device)


def _dry_step(fast, net, cfg: RunConfig, task: Task, device: torch.device, quiet) -> None:
    """One forward and backward pass through the compiled model on this run's shapes and layout
    (so it compiles now, where a failure can still fall back), inside `quiet()`, leaving no
    gradients behind."""
    with quiet():
        with autocast(device, _precision(cfg, device)):
            loss = task.loss(fast, task.dry_batch())
        loss.backward()
    net.zero_grad(set_to_none=True)


def _checkpoint(out: Path, cfg: RunConfig, state: TrainState, task: Task, report, final: bool = False) -> Path:
    """Snapshot, state and model, then the grid. The label reading is taken before the
    save inside the run, and after it at the end (a Ctrl-C or a spent budget should not wait
    on it to keep the work: the model is saved again once it is known)."""
    if _doubled(state.step // cfg.train.sample_every) and not final and knowledge_can_matter(cfg.images_seen(state.step)):
        _read_labels(out, state, task, report)
    if state.profiles:  # first, so every checkpoint has its snapshot (one left past it is dropped on resume)
        _save_ema_snapshot(out, state)
    _save(out, cfg, state, task)
    if final:
        _measure_and_save(out, cfg, state, task, report)
    report("checkpoint", step=state.step, path=out / MODEL_FILE)
    try:
        path = sample_grid(state.ema, cfg, task.class_names, out / "samples" / f"step_{state.step:07d}.png", cfg.train.seed,
                           state.trained(cfg))
        shutil.copyfile(path, out / "samples" / "latest.png")
    except OSError as e:
        raise UserError(f"could not write the grid for step {state.step} to '{out / 'samples'}' ({e.strerror or e}); "
                        "that step's checkpoint is saved.") from None
    report("grid", step=state.step, path=path)
    _plot_loss(out, report)
    return path


def _save(out: Path, cfg: RunConfig, state: TrainState, task: Task) -> None:
    try:
        state.save(out, cfg, task.class_names, epochs(state.step, task))
    except OSError as e:  # disk full, folder removed, permissions changed mid-run
        raise UserError(f"could not write the checkpoint for step {state.step} to '{out}' ({e.strerror or e}); "
                        f"the previous checkpoint there is intact.") from None


def _measure_and_save(out: Path, cfg: RunConfig, state: TrainState, task: Task, report) -> None:
    """The last model's label reading, where it can change its weight, saved with it."""
    if knowledge_can_matter(cfg.images_seen(state.step)):
        before = state.labels
        if _read_labels(out, state, task, report) and state.labels != before:
            _save(out, cfg, state, task)


def _read_labels(out: Path, state: TrainState, task: Task, report) -> bool:
    """Read the EMA's label knowledge and gain into `state`, and log them as a line of their own in
    metrics.jsonl (and to the trackers), so a run shows how its labels are learned; False where
    the task has none to read."""
    labels = task.label_reading(state.ema)
    if labels is None:
        return False
    state.labels = labels
    record = {"step": state.step, "label_knowledge": labels.knowledge, "label_gain": labels.gain}
    append_metrics(out, record)
    report("labels", **record)
    return True


def _doubled(n: int) -> bool:
    """Checkpoint n (of sample_every steps) is 1, 2, 4, 8, ...: where the label knowledge is
    measured again (and at the end), because it moves slowly and costs 6% of the training
    between two checkpoints of `small` (knowledge.IMAGES, GAIN_IMAGES); between them the last value stands."""
    return n > 0 and n & (n - 1) == 0


def _save_ema_snapshot(out: Path, state: TrainState) -> None:
    try:
        posthoc.save_snapshot(out, state.step, state.profiles)
    except OSError as e:
        raise UserError(f"could not write the EMA snapshot for step {state.step} to '{out}' ({e.strerror or e}); "
                        f"the last checkpoint there is intact.") from None


def _plot_loss(out: Path, report) -> None:
    """Refresh loss.png beside the grids where matplotlib is installed (the plots extra).
    Without it nothing is said: a first run should not greet a new user with a missing
    extra nobody asked for, and the losses are in metrics.jsonl and the trackers anyway.
    One that is installed but will not import costs a notice, never the run."""
    from diffcli.plots import loss_curve, plotting

    try:
        if plotting() and loss_curve(out / METRICS_FILE, out / "loss.png"):
            report("loss_curve", path=out / "loss.png")
    except UserError as e:
        report("notice", message=str(e))
