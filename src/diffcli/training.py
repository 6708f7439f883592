"""The training loop: ε- or v-prediction MSE, AdamW, warm-up, EMA, checkpoints, grids.

`train()` prints nothing; it reports through `report(event, **info)` so the CLI can
draw a progress bar (events: "start", "step", "log", "checkpoint", "grid", "loss_curve",
"notice", "done").

Randomness: one CPU generator (`batch_gen`) draws timesteps, noise, label dropout and
flips; each epoch's data order comes from a generator seeded with (seed, epoch). The
batch generator's state is saved with the training state, so a resumed run continues
the same random sequence.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffcli import checkpoint, compiling
from diffcli.config import DEFAULT_GUIDANCE, RunConfig, from_dict, save_yaml, to_dict
from diffcli.data import ImageData, to_model_range
from diffcli.devices import autocast, fused_adamw, memory_format, pick_device, upload
from diffcli.distributed import World, any_rank, barrier, check_batch, max_over_ranks, mean_over_ranks
from diffcli.errors import UserError
from diffcli.generate import generate
from diffcli.images import grid, save
from diffcli.schedules import Schedule, make_schedule, q_sample, v_target
from diffcli.unet import UNet

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
LOG_EVERY = 50  # steps between metrics lines and non-finite checks (the only host syncs)
MAX_ROLLBACKS = 3  # with on_nonfinite=rollback: give up after this many
STOP_CHECK_EVERY = 10  # steps between the ranks' vote on stopping (time budget, Ctrl-C)
DEFAULT_EPOCHS = 10  # when no stopping rule is given
GRID_COLUMNS = 8
GRID_MAX_ROWS = 10


@dataclass
class TrainResult:
    step: int
    epoch: float
    model_path: Path
    grid_path: Path | None
    stopped_by: str  # "steps", "epochs", "minutes" or "interrupt"


def batch_inputs(x0: torch.Tensor, labels: torch.Tensor, T: int, null_label: int, label_dropout: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs for one batch: t ~ U{0..T-1}, ε ~ N(0, I), and labels replaced by
    the "no label" index with probability `label_dropout` (Ho & Salimans 2022, Alg. 1)."""
    b = x0.shape[0]
    t = torch.randint(0, T, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < label_dropout
    return t, noise, torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(model, schedule: Schedule, prediction: str, x0, t, noise, y, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Ho et al. 2020, eq. 14 (L_simple) for ε; the same MSE on v for v-prediction.

    With min_snr_gamma > 0, each timestep is weighted by min(SNR_t, γ) / SNR_t for ε
    (÷ (SNR_t + 1) for v), the Min-SNR-γ weighting of Hang et al. 2023 (eq. 9): it stops
    the nearly noise-free timesteps from dominating the gradient, so the global layout
    is learned sooner.
    """
    x_t = q_sample(schedule, x0, t, noise)
    target = noise if prediction == "eps" else v_target(schedule, x0, t, noise)
    per_image = (model(x_t, t, y).float() - target).square().mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma > 0:
        abar = schedule.alphas_cumprod.to(x0.device)[t]
        snr = abar / (1 - abar)
        per_image = per_image * snr.clamp(max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)
    return per_image.mean()


def lr_at(step: int, cfg, progress: float) -> float:
    """Linear warm-up, then constant or cosine decay; `progress` in [0, 1] is the share of the run done."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if cfg.lr_schedule == "cosine" else 1.0
    return cfg.lr * warm * decay


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up (1 + n) / (10 + n), capped at `decay`: early on the average follows the
    weights closely, so short runs are not sampled from an average of random inits."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


# --- training state without pickle -----------------------------------------

def _state_tensors(model, ema, opt, batch_gen) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.batch"] = batch_gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"param_groups": opt_sd["param_groups"]}
    return tensors, meta


def save_state(out: Path, cfg: RunConfig, model, ema, opt, batch_gen, step: int, epoch: float, class_names) -> None:
    tensors, meta = _state_tensors(model, ema, opt, batch_gen)
    metadata = {
        "format": checkpoint.FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "class_names": json.dumps(class_names),
        "step": str(step),
        "epoch": repr(epoch),
        "optimizer": json.dumps(meta),
    }
    checkpoint.save_tensors(out / STATE_FILE, tensors, metadata)
    checkpoint.save_model(out / MODEL_FILE, ema.state_dict(), to_dict(cfg), class_names, step, epoch)


def _state_path(out: Path) -> Path:
    path = out / STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: '{path}' does not exist (is '{out}' a diffcli run folder?).")
    return path


def run_config(out: Path) -> RunConfig:
    """The config a run was trained with, from its training state's header (no weights read)."""
    return from_dict(checkpoint.model_metadata(checkpoint.read_header(_state_path(out)))["config"])


def load_state(out: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a run's training state."""
    from safetensors.torch import load_file

    path = _state_path(out)
    header = checkpoint.read_header(path)
    meta = checkpoint.model_metadata(header)
    raw = header["__metadata__"]
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(f"cannot resume: '{path}' is damaged ({e}).") from None
    meta["optimizer"] = json.loads(raw["optimizer"])
    return meta, tensors


def _restore(tensors: dict, meta: dict, model, ema, opt, batch_gen) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    # Saved moments come back contiguous; give them their parameter's layout (channels_last, mostly),
    # since the fused AdamW kernel walks a parameter and its moments as flat memory.
    for param, st in opt.state.items():
        for name, value in st.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                st[name] = torch.empty_like(param).copy_(value)
    batch_gen.set_state(tensors["rng.batch"])
    torch.set_rng_state(tensors["rng.torch"])


# --- the loop ------------------------------------------------------------------

def checkpoint_bytes(params: int) -> int:
    """Disk a run needs at most: train_state (weights, EMA, two Adam moments) + the model
    file, each written beside its predecessor before the rename, plus room for grids."""
    return 2 * (4 + 1) * 4 * params + 50_000_000


def check_free_space(out: Path, params: int) -> None:
    need, free = checkpoint_bytes(params), shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"only {free / 1e6:.0f} MB free in '{out}', and this run's checkpoints need about "
                        f"{need / 1e6:.0f} MB; free some space or choose another --out.")


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; check it is writable before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder for the run.")
    holds_run = (out / STATE_FILE).exists() or (out / MODEL_FILE).exists()
    if holds_run and not (resume or overwrite):
        raise UserError(f"'{out}' already holds a run; pass --resume to continue it or --overwrite to start over.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output folder '{out}' ({e.strerror}).") from None


def sample_grid(ema, cfg: RunConfig, schedule: Schedule, class_names: list[str], path: Path, seed: int) -> Path:
    """One row per class (up to GRID_MAX_ROWS), same seeds in every row."""
    rows = list(range(min(len(class_names), GRID_MAX_ROWS))) or [cfg.model.num_classes]  # unconditional: null
    labels = [r for r in rows for _ in range(GRID_COLUMNS)]
    seeds = [seed + i for _ in rows for i in range(GRID_COLUMNS)]
    imgs = generate(ema, schedule, cfg.diffusion.prediction, labels, seeds, "ddim", cfg.train.grid_steps, DEFAULT_GUIDANCE)
    return save(grid(imgs, GRID_COLUMNS), path)


def train(cfg: RunConfig, data: ImageData, out: Path, resume: bool = False,
          report: Callable[..., None] = lambda event, **info: None,
          should_stop: Callable[[], bool] = lambda: False,
          world: World = World(), device: torch.device | None = None) -> TrainResult:
    """Train; with `world.active` (torchrun), every rank runs this with the same seed and
    takes its contiguous share of each global batch, DDP averages the gradients, and only
    rank 0 writes files. The random draws are made for the whole global batch on every
    rank, so N processes follow a single process's trajectory step for step."""
    tc = cfg.train
    device = device or pick_device(tc.device)
    torch.manual_seed(tc.seed)  # dropout inside the network uses the global generator
    batch_gen = torch.Generator().manual_seed(tc.seed)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)

    layout = memory_format(device, tc.precision)
    net = UNet(cfg.model).to(device, memory_format=layout)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=fused_adamw(device))
    step = 0
    if resume:
        meta, tensors = load_state(out)
        _restore(tensors, meta, net, ema, opt, batch_gen)
        step = meta["step"]
        if world.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
    model = net
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if world.is_main:
        save_yaml(cfg, out / "config.yaml")

    n = data.images.shape[0]
    batch = min(tc.batch_size, n)  # the global batch: all ranks together
    local = check_batch(world, batch)
    mine = slice(world.rank * local, (world.rank + 1) * local)
    steps_per_epoch = n // batch  # drop the ragged last batch: every step sees `batch` images
    limits = [tc.max_steps or math.inf, (tc.epochs or (DEFAULT_EPOCHS if not (tc.max_steps or tc.minutes) else math.inf)) * steps_per_epoch]
    total_steps = math.ceil(min(limits)) if min(limits) < math.inf else None
    budget_s = tc.minutes * 60 if tc.minutes else None

    images = data.images.to(device)  # uint8 on the device: decoded once, no loader in the loop
    null = cfg.model.num_classes
    flip = bool(cfg.data.flip)
    params = sum(p.numel() for p in net.parameters())
    report("start", device=device, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch=batch,
           budget_s=budget_s, step=step, params=params, world=world.size)

    if world.is_main:
        check_free_space(out, params)
    model.train()
    if compiling.wanted(tc.compile, device):
        report("notice", message="compiling the U-Net with torch.compile before the first step "
                                 "(a minute or so; --no-compile skips it).")
        # Under DDP the try runs without gradient sync: a backward that fails halfway must not
        # leave the reducer mid-reduction, or the other ranks waiting in an all-reduce.
        quiet = model.no_sync if world.active else contextlib.nullcontext
        model = compiling.compiled(model, lambda fast: _dry_step(fast, net, cfg, schedule, (local, *images.shape[1:]), layout,
                                                                 device, quiet), report, device)
    guard = NonFiniteGuard(tc.on_nonfinite, device)
    start = time.monotonic()
    last_log_t, last_log_step = start, step
    loss_sum = torch.zeros((), device=device)
    grid_path = None
    stopped_by = "steps"
    order, order_epoch = None, -1
    while True:
        elapsed = time.monotonic() - start
        if total_steps is not None and step >= total_steps:
            stopped_by = "steps" if total_steps == tc.max_steps else "epochs"
            break
        # Time and Ctrl-C can differ between ranks; they agree every STOP_CHECK_EVERY steps.
        if not world.active or step % STOP_CHECK_EVERY == 0:
            if any_rank(world, budget_s is not None and elapsed >= budget_s, device):
                stopped_by = "minutes"
                break
            if any_rank(world, should_stop(), device):
                stopped_by = "interrupt"
                break
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch))
            order_epoch = epoch
        idx = order[pos * batch:(pos + 1) * batch]
        x0 = to_model_range(images[upload(idx, device)]).contiguous(memory_format=layout)
        t, noise, y = batch_inputs(x0, data.labels[idx], schedule.T, null, tc.label_dropout if null else 0.0, batch_gen)
        if flip:
            mirrored = torch.rand(batch, generator=batch_gen) < 0.5
            x0 = torch.where(upload(mirrored, device)[:, None, None, None], x0.flip(-1), x0)  # (drawn for the global batch)
        x0, t, noise, y = x0[mine], upload(t[mine], device), upload(noise[mine], device), upload(y[mine], device)

        progress = max(step / total_steps if total_steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        lr = lr_at(step, tc, progress) * guard.lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device, tc.precision):
            loss = diffusion_loss(model, schedule, cfg.diffusion.prediction, x0, t, noise, y, tc.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        ema_update(ema, net, ema_decay_at(step, tc.ema_decay))
        loss_sum += loss.detach()
        step += 1
        guard.watch(loss, step)
        report("step", step=step)

        if step % LOG_EVERY == 0 or step % tc.sample_every == 0:
            restored = guard.check(step, out, net, ema, opt, batch_gen, report, world)
            if restored is not None:  # rolled back to the last good state
                step = last_log_step = restored
                loss_sum.zero_()
                continue
        if step % LOG_EVERY == 0:
            _log_metrics(out, step, steps_per_epoch, loss_sum, step - last_log_step, lr, batch, (now := time.monotonic()),
                         last_log_t, start, report, world)
            last_log_t, last_log_step = now, step
        if step % tc.sample_every == 0 and world.is_main:
            grid_path = _checkpoint(out, cfg, net, ema, opt, batch_gen, step, steps_per_epoch, data, schedule, report)
            last_log_t = time.monotonic()  # keep images/s about training, not sampling

    guard.check(step, out, net, ema, opt, batch_gen, report, world, final=True)
    if step > last_log_step:  # the tail since the last full interval, so short runs log too
        _log_metrics(out, step, steps_per_epoch, loss_sum, step - last_log_step, lr, batch, time.monotonic(),
                     last_log_t, start, report, world)
    if step > 0 and step % tc.sample_every != 0 and world.is_main:
        grid_path = _checkpoint(out, cfg, net, ema, opt, batch_gen, step, steps_per_epoch, data, schedule, report)
    barrier(world)  # nobody leaves before rank 0 has written the last checkpoint
    report("done", step=step, stopped_by=stopped_by)
    return TrainResult(step, step / steps_per_epoch, out / MODEL_FILE, grid_path, stopped_by)


def _dry_step(fast, net, cfg: RunConfig, schedule: Schedule, shape: tuple, layout: torch.memory_format,
              device: torch.device, quiet) -> None:
    """One forward and backward pass through the compiled model on this run's shapes and layout
    (so it compiles now, where a failure can still fall back), inside `quiet()`, leaving no
    gradients behind."""
    x = torch.zeros(shape, device=device).contiguous(memory_format=layout)
    # t and y must be separate tensors: passing one for both makes dynamo guard on `t is y`,
    # and the first real step would compile everything again.
    t, y = (torch.zeros(shape[0], dtype=torch.long, device=device) for _ in range(2))
    with quiet():
        with autocast(device, cfg.train.precision):
            loss = diffusion_loss(fast, schedule, cfg.diffusion.prediction, x, t, torch.zeros_like(x), y, cfg.train.min_snr_gamma)
        loss.backward()
    net.zero_grad(set_to_none=True)


class NonFiniteGuard:
    """Notices a NaN/inf loss on the step it happens without a host sync per step: each
    step records, on the device, the first step whose loss was not finite; `check` reads
    that once per LOG_EVERY steps and before every checkpoint, so a bad state is never saved.

    mode "stop": raise with the step and advice; the last checkpoint stays intact.
    mode "rollback": go back to the state kept at the last good check, halve the learning
    rate, and continue (at most MAX_ROLLBACKS times).
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.snapshot = None

    def watch(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step)

    def check(self, step, out, model, ema, opt, batch_gen, report, world: World = World(), final: bool = False) -> int | None:
        bad = int(max_over_ranks(world, self.first_bad).item())  # every rank sees the same verdict
        if bad < 0:
            if self.mode == "rollback" and not final:
                self.snapshot = (step, *(copy.deepcopy(m.state_dict()) for m in (model, ema, opt)), batch_gen.get_state())
            return None
        if self.mode == "rollback" and self.snapshot is not None and self.rollbacks < MAX_ROLLBACKS and not final:
            good_step, m_sd, e_sd, o_sd, gen_state = self.snapshot
            model.load_state_dict(m_sd)
            ema.load_state_dict(e_sd)
            opt.load_state_dict(copy.deepcopy(o_sd))
            batch_gen.set_state(gen_state)
            self.first_bad.fill_(-1)
            self.lr_scale *= 0.5
            self.rollbacks += 1
            report("notice", message=f"the loss was not finite at step {bad}; rolled back to step {good_step} "
                                     f"and halved the learning rate (rollback {self.rollbacks} of {MAX_ROLLBACKS}).")
            return good_step
        saved = checkpoint.model_metadata(checkpoint.read_header(out / MODEL_FILE))["step"] if (out / MODEL_FILE).exists() else None
        kept = f"the last checkpoint (step {saved}) in '{out}' is intact" if saved is not None else "no checkpoint had been saved yet"
        raise UserError(f"the loss became NaN or infinite at step {bad}; {kept}. Lower --lr, keep --grad-clip on, "
                        f"or pass --on-nonfinite rollback.")


def _log_metrics(out: Path, step, steps_per_epoch, loss_sum, steps, lr, batch, now, last_t, start, report, world):
    """Append one line to metrics.jsonl: the mean loss since the last line over all ranks (one host sync)."""
    mean_loss = mean_over_ranks(world, loss_sum / steps).item()
    loss_sum.zero_()
    if not world.is_main:
        return
    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss, "lr": lr,
              "images_per_s": batch * steps / max(now - last_t, 1e-9), "elapsed_s": now - start}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    report("log", **record)


def _checkpoint(out, cfg, model, ema, opt, batch_gen, step, steps_per_epoch, data, schedule, report) -> Path:
    try:
        save_state(out, cfg, model, ema, opt, batch_gen, step, step / steps_per_epoch, data.class_names)
    except OSError as e:  # disk full, folder removed, permissions changed mid-run
        raise UserError(f"could not write the checkpoint for step {step} to '{out}' ({e.strerror or e}); "
                        f"the previous checkpoint there is intact.") from None
    report("checkpoint", step=step, path=out / MODEL_FILE)
    path = sample_grid(ema, cfg, schedule, data.class_names, out / "samples" / f"step_{step:07d}.png", cfg.train.seed)
    shutil.copyfile(path, out / "samples" / "latest.png")
    report("grid", step=step, path=path)
    _plot_loss(out, report)
    return path


def _plot_loss(out: Path, report) -> None:
    """Refresh loss.png beside the grids; without matplotlib, say so once and go on."""
    from diffcli.plots import loss_curve

    try:
        if loss_curve(out / "metrics.jsonl", out / "loss.png"):
            report("loss_curve", path=out / "loss.png")
    except UserError as e:
        report("notice", message=str(e))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint we continue from (and a last
    line a kill cut short, which `read_metrics` skips)."""
    from diffcli.plots import read_metrics

    if not path.exists():
        return
    keep = [json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step]
    checkpoint.atomic_write_bytes(path, "".join(keep).encode())
