"""The `diffcli` command: parse options, call one core function, print with rich.

torch is imported inside the commands, never at module level, so `diffcli --help`
answers quickly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffcli import __version__
from diffcli.config import DEFAULT_GUIDANCE
from diffcli.errors import UserError

app = typer.Typer(
    name="diffcli",
    help="Train class-conditional diffusion models on small image datasets and sample from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 1  # a problem the user can fix; usage errors from the parser exit 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention


def user_errors(fn):
    """Print a UserError as one sentence on stderr and exit non-zero, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    return wrapper


def _setup_logging() -> None:
    import logging

    from rich.logging import RichHandler

    log = logging.getLogger("diffcli")
    if not log.handlers:
        log.addHandler(RichHandler(console=err_console, show_time=False, show_path=False))
        log.setLevel(logging.INFO)


def _version(value: bool):
    if value:
        console.print(f"diffcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")):
    """Train class-conditional diffusion models on small image datasets and sample from them."""
    from diffcli.allocator import keep_freed_memory

    keep_freed_memory()  # the process is ours: keep activation memory mapped between steps


# --- train ------------------------------------------------------------------------

@app.command()
@user_errors
def train(
    data: Optional[str] = typer.Option(None, help="shapes (built in, no download), mnist, fashion-mnist, cifar10, or a folder of images (sub-folders = classes)."),
    data_root: Optional[str] = typer.Option(None, help="Where named datasets live or are downloaded to (default: $DIFFCLI_DATA_ROOT, else ~/.cache/diffcli/datasets)."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this size (default: the dataset's own)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N images (quick experiments)."),
    out: Path = typer.Option(Path("runs/latest"), help="Run folder: model.safetensors, train_state, config.yaml, metrics.jsonl, samples/."),
    preset: Optional[str] = typer.Option(None, help="Model size: tiny (tests), small (MNIST on a CPU, the default), base (DDPM CIFAR-10, 35.7M)."),
    config: Optional[Path] = typer.Option(None, help="YAML config (the same format as a run's config.yaml); options given here override it."),
    epochs: Optional[float] = typer.Option(None, help="Stop after this many passes over the data (default: 10 when no other limit is set)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget: stop cleanly, save and sample when it is spent."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default: preset)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of AdamW (default: preset)."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant or cosine (after warm-up)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear learning-rate warm-up steps (default: preset)."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay of the weights used for sampling (default: preset)."),
    label_dropout: Optional[float] = typer.Option(None, help="Share of labels dropped, for classifier-free guidance (default: 0.1)."),
    min_snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-γ loss weighting; 0 = plain MSE (default: 5)."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm at this value; 0 turns clipping off (default: 1.0)."),
    timesteps: Optional[int] = typer.Option(None, help="Diffusion steps T (default: 1000)."),
    schedule: Optional[str] = typer.Option(None, help="Noise schedule: linear or cosine (default: cosine)."),
    prediction: Optional[str] = typer.Option(None, help="What the network predicts: v or eps (default: v)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips (default: on for cifar10 and folders)."),
    on_nonfinite: Optional[str] = typer.Option(None, help="When the loss becomes NaN/inf: stop (keep the last checkpoint) or rollback (to the last good state, halving the LR) (default: stop)."),
    sample_every: Optional[int] = typer.Option(None, help="Steps between checkpoints and sample grids (default: preset)."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps."),
    seed: Optional[int] = typer.Option(None, help="Seed for initialisation, data order and noise (default: 0)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the U-Net: faster steps after a minute or so of compiling (default: on for CUDA only)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 elsewhere), fp32, or bf16 (also on the CPU: faster where it has AMX, slower where it does not)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out folder that holds another run."),
):
    """Train a class-conditional diffusion model."""
    _setup_logging()
    from diffcli import config as C

    cli_values = {
        "model": {},
        "diffusion": {"timesteps": timesteps, "schedule": schedule, "prediction": prediction},
        "data": {"name": data, "root": data_root, "image_size": image_size, "flip": flip, "limit": limit},
        "train": {"epochs": epochs, "max_steps": max_steps, "minutes": minutes, "batch_size": batch_size, "lr": lr,
                  "lr_schedule": lr_schedule, "warmup_steps": warmup_steps, "ema_decay": ema_decay,
                  "label_dropout": label_dropout, "min_snr_gamma": min_snr_gamma, "grad_clip": grad_clip, "on_nonfinite": on_nonfinite, "sample_every": sample_every,
                  "device": device, "seed": seed, "compile": compile, "precision": precision},
    }
    if resume:
        from diffcli.training import run_config

        cfg = run_config(out)
        # A resumed run keeps its recipe; only where to stop and where and how to run may change.
        stop = {k: cli_values["train"][k] for k in ("epochs", "max_steps", "minutes") if cli_values["train"][k] is not None}
        if stop:
            cfg.train.epochs = cfg.train.max_steps = cfg.train.minutes = None
        run_on = {k: cli_values["train"][k] for k in ("device", "compile", "precision") if cli_values["train"][k] is not None}
        if stop or run_on:
            C.apply_overrides(cfg, {"train": {**stop, **run_on}})
        C.validate(cfg)
    else:
        cfg = C.build_config(preset, str(config) if config else None, cli_values)
        _absolute_data_paths(cfg)
    _run_training(cfg, out, resume, overwrite)


def _absolute_data_paths(cfg) -> None:
    """Write data paths into config.yaml as absolute paths, so `--resume` and `--config`
    work from any folder (a relative 'data' would be looked up where the command runs)."""
    from diffcli.data import NAMED

    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.name not in NAMED:
        cfg.data.name = str(Path(cfg.data.name).expanduser().resolve())


def _run_training(cfg, out: Path, resume: bool, overwrite: bool) -> None:
    from diffcli import data as D
    from diffcli import distributed
    from diffcli.devices import describe
    from diffcli.training import prepare_out

    world, device = distributed.setup(cfg.train.device)
    if world.active:
        err_console.print(f"rank {world.rank} of {world.size}: {describe(device)}, pid {os.getpid()}", highlight=False)
    if not world.is_main:  # rank 0 speaks and writes for the run
        console.quiet = err_console.quiet = True
    try:
        if world.is_main:
            prepare_out(out, resume, overwrite)
        # Rank 0 loads first (it may extract archives); the others then read what it left.
        for turn in (True, False):
            if world.is_main == turn:
                with console.status(f"loading {cfg.data.name} ..."):
                    data = D.load(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.limit)
            distributed.barrier(world)
        _resolve_data_settings(cfg, data)
        _print_dataset(data)
        _train_with_progress(cfg, data, out, resume, world, device)
    finally:
        distributed.shutdown(world)


def _train_with_progress(cfg, data, out, resume, world, device) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from diffcli.devices import describe
    from diffcli.training import train as train_loop

    stop_requested = {"count": 0}

    def on_sigint(signum, frame):
        stop_requested["count"] += 1
        if stop_requested["count"] > 1:
            raise KeyboardInterrupt
        err_console.print("[yellow]stopping after this step and saving (Ctrl-C again to quit at once)...[/]")

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    task = {}

    def report(event, **info):
        if event == "start":
            ranks = f" over {info['world']} processes ({info['batch'] // info['world']} each)" if info["world"] > 1 else ""
            console.print(f"device: [bold]{describe(info['device'])}[/]; {info['params']:,} parameters; "
                          f"global batch {info['batch']}{ranks}, {info['steps_per_epoch']} steps per epoch"
                          + (f"; budget {info['budget_s'] / 60:g} min" if info["budget_s"] else ""), highlight=False)
            total = info["total_steps"] if info["total_steps"] else info["budget_s"]
            task["by_time"] = not info["total_steps"]
            task["t0"] = time.monotonic()
            task["id"] = progress.add_task("train", total=total, completed=0 if task["by_time"] else info["step"], info="")
        elif event == "step":
            if task["by_time"]:
                progress.update(task["id"], completed=min(time.monotonic() - task["t0"], progress.tasks[0].total))
            else:
                progress.update(task["id"], completed=info["step"])
        elif event == "log":
            progress.update(task["id"], info=f"step {info['step']} loss {info['loss']:.4f} {info['images_per_s']:.0f} img/s")
        elif event == "notice" and info["message"] not in task.setdefault("notices", set()):
            task["notices"].add(info["message"])
            progress.console.print(f"[yellow]note:[/] {escape(info['message'])}", highlight=False)
        elif event == "grid":
            progress.console.print(f"step {info['step']}: checkpoint and sample grid [cyan]{info['path']}[/]", highlight=False)

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        with progress:
            result = train_loop(cfg, data, out, resume, report, should_stop=lambda: stop_requested["count"] > 0,
                                world=world, device=device)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    console.print(f"[bold green]done[/]: {result.step} steps ({result.epoch:.2f} epochs), stopped by {result.stopped_by}.")
    console.print(f"model: [cyan]{result.model_path}[/]")
    if result.grid_path:
        console.print(f"samples: [cyan]{result.grid_path}[/]")
    console.print(f"next: diffcli sample --ckpt {result.model_path} --label all --out samples.png", highlight=False)
    if result.stopped_by == "interrupt":
        raise typer.Exit(EXIT_INTERRUPTED)


def _resolve_data_settings(cfg, data) -> None:
    """Fill the model's data-dependent fields and the data defaults into the config."""
    from diffcli.config import validate

    n, c, h, w = data.images.shape
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = h, c, data.num_classes
    if cfg.data.flip is None:
        cfg.data.flip = cfg.data.name not in ("shapes", "mnist", "fashion-mnist")  # digits and arrows have a handedness
    factor = cfg.model.patch_size * 2 ** (len(cfg.model.channel_mult) - 1)
    if h % factor:
        raise UserError(f"image size {h} is not divisible by {factor} (the U-Net's patch size times its downsampling); "
                        f"pass --image-size with a multiple of {factor}.")
    validate(cfg)


def _print_dataset(data) -> None:
    import torch

    n, c, h, w = data.images.shape
    table = Table(title=f"dataset: {data.name}", show_header=False, title_justify="left")
    table.add_row("images", f"{n:,}")
    table.add_row("size", f"{h}x{w}, {c} channel{'s' if c > 1 else ''}, uint8 {int(data.images.min())}..{int(data.images.max())}")
    if data.class_names:
        counts = torch.bincount(data.labels, minlength=data.num_classes).tolist()
        shown = ", ".join(f"{name} {k}" for name, k in list(zip(data.class_names, counts))[:12])
        table.add_row("classes", f"{data.num_classes}: {shown}{' ...' if data.num_classes > 12 else ''}")
        if min(counts) * 2 < max(counts):
            err_console.print(f"[yellow]warning:[/] classes are unbalanced ({min(counts)} to {max(counts)} images).")
    else:
        table.add_row("classes", "none (unconditional)")
    console.print(table)
    if n < 1000:
        err_console.print(f"[yellow]warning:[/] only {n} images: a diffusion model this size may memorise them.")


# --- sample -----------------------------------------------------------------------

@app.command()
@user_errors
def sample(
    ckpt: Path = typer.Option(..., help="A model.safetensors written by `diffcli train`."),
    label: str = typer.Option("all", help="Class to draw: an index, a class name, several joined by commas, or all."),
    n: int = typer.Option(8, help="Images per label."),
    sampler: str = typer.Option("ddim", help="ddpm (stochastic, all T steps), ddim (deterministic with --eta 0) or dpm++ (DPM-Solver++ 2M)."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: ddim 50, dpm++ 20, ddpm T)."),
    eta: float = typer.Option(0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like."),
    guidance: Optional[float] = typer.Option(None, help=f"Classifier-free guidance weight: 1 plain conditional, 0 unconditional (default: {DEFAULT_GUIDANCE:g})."),
    variance: str = typer.Option("beta_tilde", help="DDPM step variance: beta_tilde (posterior) or beta."),
    clip: bool = typer.Option(True, "--clip/--no-clip", help="Clip the predicted x0 to the data range at every step."),
    seed: int = typer.Option(0, help="Image i is made from seed SEED+i, whatever the batch size."),
    out: Path = typer.Option(Path("samples.png"), help="The grid image to write (one row per label)."),
    save_individual: Optional[Path] = typer.Option(None, help="Also write every image as its own PNG into this folder."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    trajectory: Optional[Path] = typer.Option(None, help="Also draw the denoising trajectory: a .png strip (x_t and predicted x0, one row per image) or a .gif animation."),
    frames: int = typer.Option(8, help="Steps shown in --trajectory, evenly spaced."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the U-Net first: pays off for many images on a GPU."),
):
    """Generate images from a trained model."""
    from diffcli.samplers import DEFAULT_STEPS, SAMPLERS

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    for name, value, low in (("--n", n, 1), ("--batch-size", batch_size, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}.")
    if guidance is not None and guidance < 0:
        raise UserError(f"--guidance must be 0 or more, got {guidance:g}.")
    if eta < 0:
        raise UserError(f"--eta must be 0 or more, got {eta:g}.")
    if variance not in ("beta_tilde", "beta"):
        raise UserError("--variance must be beta_tilde or beta.")
    if trajectory is not None and trajectory.suffix.lower() not in (".png", ".gif"):
        raise UserError(f"--trajectory must end in .png or .gif, got '{trajectory.name}'.")
    if not 1 <= frames <= 100:
        raise UserError(f"--frames must be between 1 and 100, got {frames}.")

    from diffcli.checkpoint import load_model
    from diffcli.devices import describe, pick_device, timed
    from diffcli.generate import Trajectory, compiled_for_sampling, generate
    from diffcli.images import grid, save, to_pil, trajectory_gif, trajectory_strip
    from diffcli.schedules import make_schedule

    dev = pick_device(device)
    model, cfg, meta = load_model(ckpt, dev)
    T = cfg.diffusion.timesteps
    if steps is not None and not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T={T}, got {steps}.")
    if sampler == "ddpm" and steps not in (None, T):
        raise UserError(f"ddpm runs all T={T} steps; for fewer steps use --sampler ddim (with --eta 1 for a stochastic one).")
    labels = parse_labels(label, meta["class_names"])
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    schedule = make_schedule(cfg.diffusion.schedule, T)
    per_image = [lab for lab in labels for _ in range(n)]
    seeds = list(range(seed, seed + len(per_image)))
    used_steps = T if sampler == "ddpm" else (steps or DEFAULT_STEPS[sampler])
    if compile:
        with console.status(f"compiling the U-Net for {describe(dev)} ..."):
            model = compiled_for_sampling(model, schedule, cfg.diffusion.prediction, per_image, seeds, guidance, batch_size,
                                          _print_notice)
    with console.status(f"sampling {len(per_image)} images with {sampler}, {used_steps} steps on {describe(dev)} ..."):
        recorder = Trajectory(used_steps, frames) if trajectory else None
        imgs, seconds = timed(lambda: generate(model, schedule, cfg.diffusion.prediction, per_image, seeds, sampler,
                                               used_steps, guidance, eta, variance, clip, batch_size, callback=recorder), dev)
    ncol = n if len(labels) > 1 else math.ceil(n ** 0.5)  # one label: a square-ish grid
    try:
        save(grid(imgs, ncol), out)
        if save_individual:
            names = meta["class_names"]
            for i, (img, lab, s) in enumerate(zip(imgs, per_image, seeds)):
                tag = names[lab] if lab < len(names) else "uncond"
                save(to_pil(img), save_individual / f"{i:05d}_{_safe(tag)}_seed{s}.png")
        if trajectory and trajectory.suffix.lower() == ".gif":
            trajectory_gif(recorder.xt, recorder.x0, imgs, trajectory)
        elif trajectory:
            save(trajectory_strip(recorder.xt, recorder.x0, recorder.timesteps, imgs, scale=_scale(imgs)), trajectory)
    except (OSError, ValueError) as e:
        raise UserError(f"could not write the images to '{out}': {e}.") from None
    console.print(f"wrote [cyan]{out}[/]: {len(per_image)} images, {sampler} {used_steps} steps, guidance {guidance:g}, "
                  f"{seconds:.1f} s ({len(per_image) / seconds:.1f} images/s) on {describe(dev)}", highlight=False)
    if trajectory:
        console.print(f"trajectory: [cyan]{trajectory}[/] (t = {', '.join(map(str, recorder.timesteps))})", highlight=False)


def _print_notice(event: str, message: str) -> None:
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)


def _scale(imgs) -> int:
    """Enlarge small images in figures so their captions (~48 px of text) fit under them."""
    return max(1, 48 // imgs.shape[-1] + (48 % imgs.shape[-1] > 0))


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


def parse_labels(text: str, class_names: list[str]) -> list[int]:
    """'all', '3', 'cat', '1,cat,7' -> class indices; unconditional models take only 'all'."""
    k = len(class_names)
    if k == 0:
        if text.strip().lower() not in ("all", ""):
            raise UserError("this model was trained without classes; use --label all.")
        return [0]  # index num_classes (= 0) is the "no label" token
    if text.strip().lower() == "all":
        return list(range(k))
    lower = {name.lower(): i for i, name in enumerate(class_names)}
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() in lower:
            out.append(lower[part.lower()])
        elif part.lstrip("-").isdigit():
            i = int(part)
            if not 0 <= i < k:
                raise UserError(f"--label {i} is out of range: this model has classes 0..{k - 1}.")
            out.append(i)
        else:
            shown = ", ".join(class_names[:12]) + (" ..." if k > 12 else "")
            raise UserError(f"unknown class '{part}'; this model's classes are: {shown}.")
    return out


# --- compare --------------------------------------------------------------------------

def _csv(text: str, kind, option: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} must be a comma-separated list, got '{text}'.") from None
    if not values:
        raise UserError(f"{option} is empty.")
    return values


@app.command()
@user_errors
def compare(
    ckpt: Path = typer.Option(..., help="A model.safetensors written by `diffcli train`."),
    samplers: str = typer.Option("ddpm,ddim,dpm++", help="Comma-separated samplers, one row each."),
    steps: str = typer.Option("10,20,50", help="Comma-separated step counts, one column each (ddpm always runs all T)."),
    guidance: Optional[str] = typer.Option(None, help=f"Comma-separated guidance weights, a row each per sampler (default: {DEFAULT_GUIDANCE:g})."),
    label: str = typer.Option("0", help="The class to draw (index or name)."),
    n: int = typer.Option(4, help="Images per cell."),
    seed: int = typer.Option(0, help="Seeds SEED..SEED+n-1: the same starting noise in every cell."),
    out: Path = typer.Option(Path("compare.png"), help="The contact sheet to write."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
):
    """Contact sheet of samplers x steps (x guidance) from the same starting noise, each cell timed."""
    from diffcli.samplers import SAMPLERS

    names = _csv(samplers, str, "--samplers")
    bad = [s for s in names if s not in SAMPLERS]
    if bad:
        raise UserError(f"unknown sampler '{bad[0]}'; choose from {', '.join(SAMPLERS)}.")
    step_list = _csv(steps, int, "--steps")
    weights = _csv(guidance, float, "--guidance") if guidance else [DEFAULT_GUIDANCE]
    if any(w < 0 for w in weights):
        raise UserError("--guidance values must be 0 or more.")
    if not 1 <= n <= 64:
        raise UserError(f"--n must be between 1 and 64, got {n}.")

    from diffcli.checkpoint import load_model
    from diffcli.devices import describe, pick_device
    from diffcli.generate import sweep
    from diffcli.images import contact_sheet, grid, save
    from diffcli.schedules import make_schedule

    dev = pick_device(device)
    model, cfg, meta = load_model(ckpt, dev)
    T = cfg.diffusion.timesteps
    if any(not 1 <= k <= T for k in step_list):
        raise UserError(f"--steps must lie between 1 and T={T}, got {steps}.")
    lab = parse_labels(label, meta["class_names"])[0]
    columns = sorted(set(step_list) | ({T} if "ddpm" in names else set()))
    rows = [(s, w) for s in names for w in weights]
    runs = [(s, k, w) for s, w in rows for k in columns if (k == T if s == "ddpm" else k in step_list)]
    seeds = list(range(seed, seed + n))
    with console.status(f"sampling {len(runs)} cells of {n} images on {describe(dev)} ..."):
        results = dict(zip(runs, sweep(model, make_schedule(cfg.diffusion.schedule, T), cfg.diffusion.prediction,
                                       lab, seeds, runs)))
    cells = []
    for s, w in rows:
        row = []
        for k in columns:
            if (s, k, w) not in results:
                row.append((None, "ddpm runs all T steps" if s == "ddpm" else ""))
                continue
            imgs, seconds = results[(s, k, w)]
            g = grid(imgs, n)
            scale = _scale(imgs)
            row.append((g.resize((g.width * scale, g.height * scale), 0), f"{s} {k} steps w={w:g}: {seconds:.1f} s"))
        cells.append(row)
    try:
        save(contact_sheet(cells), out)
    except (OSError, ValueError) as e:
        raise UserError(f"could not write '{out}': {e}.") from None
    name = meta["class_names"][lab] if meta["class_names"] else "unconditional"
    console.print(f"wrote [cyan]{out}[/]: {len(rows)} rows x {len(columns)} columns, label {name}, seeds {seed}..{seed + n - 1}",
                  highlight=False)


# --- classifier and eval ------------------------------------------------------------

classifier_app = typer.Typer(help="Reference classifiers for `diffcli eval`.", no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train")
@user_errors
def classifier_train(
    data: str = typer.Option(..., help="shapes, mnist, fashion-mnist, cifar10, or a folder of images (sub-folders = classes)."),
    data_root: Optional[str] = typer.Option(None, help="Where named datasets live (default: $DIFFCLI_DATA_ROOT, else ~/.cache/diffcli/datasets)."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this size: the size of the models it will judge."),
    limit: Optional[int] = typer.Option(None, help="Train on only the first N training images (quick experiments)."),
    out: Optional[Path] = typer.Option(None, help="The .safetensors file to write (default: DATA-classifier.safetensors)."),
    epochs: float = typer.Option(3.0, help="Passes over the training split."),
    batch_size: int = typer.Option(128, help="Images per step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle: warm-up, then cosine to zero)."),
    width: Optional[int] = typer.Option(None, help="Channels at full resolution (default: 16)."),
    seed: int = typer.Option(0, help="Seed for initialisation, data order and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
):
    """Train the classifier that `diffcli eval` uses to judge class fidelity; scores it on the test split."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from diffcli import data as D
    from diffcli.classifier import (
        ClassifierConfig,
        held_out,
        save_classifier,
        train_classifier,
    )
    from diffcli.devices import describe, pick_device

    if epochs <= 0 or batch_size < 1 or lr <= 0 or (width is not None and width < 1) or (limit is not None and limit < 1):
        raise UserError("--epochs, --batch-size, --lr, --width and --limit must be positive.")
    out = out or Path(f"{_safe(Path(data).name if data not in D.NAMED else data)}-classifier.safetensors")
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it or choose another --out.")
    dev = pick_device(device)
    with console.status(f"loading {data} ..."):
        train_data = D.load(data, data_root, image_size)
        if data in D.NAMED:
            test_data, held = D.load(data, data_root, image_size, split="test"), "test split"
        else:
            train_data, test_data = held_out(train_data)
            held = "10% held out"
        if limit:
            train_data = D.ImageData(train_data.images[:limit], train_data.labels[:limit], train_data.class_names, train_data.name)
    console.print(f"{data}: {len(train_data.labels):,} training images, {len(test_data.labels):,} test images ({held}); "
                  f"{describe(dev)}", highlight=False)
    progress = Progress(TextColumn("[bold]classifier"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("train", total=None, info="")

        def report(event, step, total, loss):
            if step % 20 == 0 or step == total:
                progress.update(task, total=total, completed=step, info=f"loss {loss:.3f}")

        model, scores = train_classifier(train_data, test_data, epochs, batch_size, lr, width or ClassifierConfig.width,
                                         seed, dev, report)
    try:
        save_classifier(out, model, train_data.class_names, data, scores)
    except OSError as e:
        raise UserError(f"could not write '{out}' ({e.strerror}).") from None
    console.print(f"test accuracy [bold]{scores['test_accuracy']:.2%}[/] on {scores['test_images']:,} images", highlight=False)
    table = Table(show_header=False)
    for name, acc in zip(train_data.class_names, scores["per_class_accuracy"]):
        table.add_row(name, "-" if acc is None else f"{acc:.2%}")
    console.print(table)
    console.print(f"wrote [cyan]{out}[/]; next: diffcli eval --ckpt MODEL --classifier {out}", highlight=False)


@app.command("eval")
@user_errors
def evaluate(
    ckpt: Path = typer.Option(..., help="A model.safetensors written by `diffcli train`."),
    classifier: Optional[Path] = typer.Option(None, help="A classifier from `diffcli classifier train`: class accuracy and classifier-FD."),
    fid: bool = typer.Option(False, "--fid", help="Also compute Inception-v3 FID against the test split (slow on a CPU)."),
    inception_weights: Optional[Path] = typer.Option(None, help="The FID Inception weights file, if not in torch's hub cache."),
    memorisation: bool = typer.Option(True, "--memorisation/--no-memorisation", help="Distances to the nearest training images."),
    pairs: Optional[Path] = typer.Option(None, help="Write a contact sheet of the samples closest to a training image."),
    n: int = typer.Option(100, help="Images generated per class."),
    sampler: str = typer.Option("ddim", help="ddpm, ddim or dpm++."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the sampler's)."),
    guidance: Optional[float] = typer.Option(None, help=f"Classifier-free guidance weight (default: {DEFAULT_GUIDANCE:g})."),
    seed: int = typer.Option(0, help="Image i is made from seed SEED+i."),
    data: Optional[str] = typer.Option(None, help="The real images to compare with (default: the model's training data)."),
    data_root: Optional[str] = typer.Option(None, help="Where that dataset lives (default: as when the model was trained)."),
    real_n: Optional[int] = typer.Option(None, help="Use only the first N real test images as the reference (default: all)."),
    batch_size: int = typer.Option(250, help="Images per forward pass while sampling."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Measure a model's samples: class accuracy, classifier-FD, memorisation, and Inception FID."""
    from diffcli.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    if n < 2:
        raise UserError(f"--n must be at least 2 (a covariance needs two images), got {n}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if real_n is not None and real_n < 2:
        raise UserError(f"--real-n must be at least 2, got {real_n}.")
    if guidance is not None and guidance < 0:
        raise UserError(f"--guidance must be 0 or more, got {guidance:g}.")
    if not (classifier or fid or memorisation):
        raise UserError("nothing to measure: give --classifier, --fid, or leave --memorisation on.")

    from diffcli.checkpoint import load_model
    from diffcli.devices import describe, pick_device

    dev = pick_device(device)
    model, cfg, meta = load_model(ckpt, dev)
    report = _run_eval(ckpt, model, cfg, meta, dev, classifier, fid, inception_weights, memorisation, pairs, n, sampler, steps,
                       guidance, seed, data or cfg.data.name, data_root or cfg.data.root, real_n, batch_size)
    report["device"] = describe(dev)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_eval(report, meta["class_names"])


def _run_eval(ckpt, model, cfg, meta, dev, classifier, fid, inception_weights, memorisation, pairs, n, sampler, steps, guidance,
              seed, data_name, data_root, real_n, batch_size) -> dict:
    from diffcli import evaluation as E
    from diffcli.samplers import DEFAULT_STEPS

    T = cfg.diffusion.timesteps
    if steps is not None and not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and T={T}, got {steps}.")
    if sampler == "ddpm" and steps not in (None, T):
        raise UserError(f"ddpm runs all T={T} steps; for fewer steps use --sampler ddim.")
    clf = clf_meta = None
    if classifier:
        from diffcli.classifier import load_classifier

        if not meta["class_names"]:
            raise UserError("this model was trained without classes, so there is no class fidelity to measure; drop --classifier.")
        clf, clf_meta = load_classifier(classifier, dev)
        c = clf_meta["config"]
        if (c.in_channels, c.image_size, c.num_classes) != (cfg.model.in_channels, cfg.model.image_size, cfg.model.num_classes):
            raise UserError(f"the classifier takes {c.image_size}x{c.image_size}x{c.in_channels} images of {c.num_classes} classes, "
                            f"but the model makes {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.in_channels} images "
                            f"of {cfg.model.num_classes}; train one with --data {data_name} --image-size {cfg.model.image_size}.")
    inception = None
    if fid:
        from diffcli.inception import load_inception

        with console.status("loading Inception-v3 ..."):
            inception = load_inception(inception_weights, dev)
    # The real images before sampling: a missing dataset should fail before minutes of work.
    with console.status(f"loading {data_name} ..."):
        real = E.real_images(data_name, data_root, cfg.model.image_size, real_n)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if tuple(real.train.images.shape[1:]) != shape:
        raise UserError(f"'{data_name}' holds {tuple(real.train.images.shape[1:])} images but the model makes "
                        f"{shape}; pass --data with the model's training data.")
    settings = E.Sampling(n, sampler, T if sampler == "ddpm" else (steps or DEFAULT_STEPS[sampler]),
                          DEFAULT_GUIDANCE if guidance is None else guidance, seed, batch_size)
    report, images, mem = E.evaluate(model, cfg, meta["class_names"], settings, real, clf, inception, memorisation,
                                     status=console.status)
    if clf is not None:
        report["classifier"] = {"path": str(classifier), "test_accuracy": clf_meta["test_accuracy"]}
    if pairs and mem is not None:
        _write_pairs(pairs, images, real.train.images, mem)
    return {"model": str(ckpt), "dataset": data_name, **report}


def _write_pairs(path: Path, images, train_images, mem: dict, k: int = 16, per_row: int = 4) -> None:
    """The k samples closest to a training image, each (left) beside that image (right),
    closest first, captioned with their RMS distance."""
    from diffcli.images import contact_sheet, hstack, save, to_pil

    order = mem["distances"].argsort()[:k].tolist()
    scale = _scale(images)

    def big(img):
        pic = to_pil(img)
        return pic.resize((pic.width * scale, pic.height * scale), 0)

    cells = [(hstack([big(images[i]), big(train_images[mem["nearest"][i]])]), f"d = {float(mem['distances'][i]):.3f}")
             for i in order]
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    rows[-1] += [(None, "")] * (per_row - len(rows[-1]))
    try:
        save(contact_sheet(rows), path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not write '{path}': {e}.") from None


def _print_eval(report: dict, class_names: list[str]) -> None:
    console.print(f"{report['images']:,} images from {report['model']}: {report['sampler']} {report['steps']} steps, "
                  f"guidance {report['guidance']:g}, seeds {report['seed']}.., {report['sampling_s']:.1f} s on {report['device']}",
                  highlight=False)
    table = Table(show_header=True, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("for scale")
    if "class_accuracy" in report:
        table.add_row("class accuracy", f"{report['class_accuracy']:.2%}",
                      f"the classifier scores {report['classifier']['test_accuracy']:.2%} on real test images")
        table.add_row("classifier-FD", f"{report['classifier_fd']:.3f}",
                      f"real training images score {report['classifier_fd_real_floor']:.3f} (lower is better)")
    if "fid" in report:
        table.add_row("FID (Inception-v3)", f"{report['fid']:.2f}", f"against {report['fid_reference']}")
    if "nn_ratio" in report:
        table.add_row("nearest-training-image distance", f"{report['nn_distance_generated']:.3f}",
                      f"median RMS; real test images: {report['nn_distance_real']:.3f} (ratio {report['nn_ratio']:.2f})")
        table.add_row("samples closer than 99% of real", f"{report['close_share']:.1%}", "about 1% when nothing is copied")
    console.print(table)
    if "per_class_accuracy" in report:
        shown = ", ".join(f"{name} {'-' if acc is None else f'{acc:.0%}'}" for name, acc in zip(class_names, report["per_class_accuracy"]))
        console.print(f"class accuracy per class: {shown}", highlight=False)


# --- noise-preview ----------------------------------------------------------------

@app.command("noise-preview")
@user_errors
def noise_preview(
    image: Optional[Path] = typer.Argument(None, help="Any PNG/JPEG/GIF/BMP/WebP image (optional with --plot)."),
    out: Path = typer.Option(Path("noise_preview.png"), help="Where to write the strip."),
    plot: Optional[Path] = typer.Option(None, help="Also plot alpha_bar_t and log-SNR against t for the schedules (needs matplotlib)."),
    steps: Optional[str] = typer.Option(None, help="Comma-separated timesteps to show, e.g. 0,50,100,250,500,999."),
    frames: int = typer.Option(8, help="Evenly spaced frames from t=0 to T-1 (when --steps is not given)."),
    schedule: str = typer.Option("cosine", help="linear, cosine, or all (one row per schedule)."),
    timesteps: int = typer.Option(1000, help="Diffusion steps T."),
    image_size: int = typer.Option(64, help="The image is center-cropped and resized to this size."),
    seed: int = typer.Option(0, help="Seed of the noise."),
):
    """Show what the forward (noising) process does to an image, and plot the schedules."""
    from diffcli.schedules import SCHEDULES

    names = list(SCHEDULES) if schedule == "all" else [schedule]
    if any(s not in SCHEDULES for s in names):
        raise UserError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)} or all.")
    if timesteps < 2:
        raise UserError(f"--timesteps must be at least 2, got {timesteps}.")
    if not 4 <= image_size <= 1024:
        raise UserError(f"--image-size must be between 4 and 1024, got {image_size}.")
    if steps:
        try:
            ts = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--steps must be comma-separated integers, got '{steps}'.") from None
        bad = [t for t in ts if not 0 <= t < timesteps]
        if bad or not ts:
            raise UserError(f"--steps must lie in 0..{timesteps - 1}; got {bad or steps}.")
    else:
        if not 1 <= frames <= 100:
            raise UserError(f"--frames must be between 1 and 100, got {frames}.")
        from diffcli.preview import even_steps

        ts = even_steps(timesteps, frames)
    if image is None and plot is None:
        raise UserError("give an image to noise, or --plot FILE.png for the schedule plot.")
    if plot is not None:
        from diffcli.plots import schedule_plot
        from diffcli.schedules import make_schedule

        try:
            schedule_plot([make_schedule(name, timesteps) for name in SCHEDULES], plot)  # the plot compares them all
        except OSError as e:
            raise UserError(f"could not write '{plot}': {e.strerror}.") from None
        console.print(f"wrote [cyan]{plot}[/]: alpha_bar_t and log-SNR for {', '.join(SCHEDULES)} (T={timesteps})", highlight=False)
        if image is None:
            return
    if not image.exists():
        raise UserError(f"image '{image}' does not exist.")
    if image.is_dir():
        raise UserError(f"'{image}' is a folder; give an image file.")

    from diffcli.images import open_image, save
    from diffcli.preview import noise_preview as draw

    try:
        img = open_image(image)
    except ValueError as e:
        raise UserError(f"cannot use '{image}': {e}.") from None
    except OSError as e:
        raise UserError(f"cannot read '{image}' ({e.strerror}).") from None
    try:
        save(draw(img, names, timesteps, ts, image_size, seed), out)
    except (OSError, ValueError) as e:
        raise UserError(f"could not write '{out}': {e}.") from None
    console.print(f"wrote [cyan]{out}[/]: t = {', '.join(map(str, ts))} ({', '.join(names)}, T={timesteps})", highlight=False)


# --- inspect ------------------------------------------------------------------------

@app.command()
@user_errors
def inspect(
    ckpt: Path = typer.Argument(..., help="A .safetensors file written by diffcli, or a run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Tell what a checkpoint (or a run folder) holds; reads only file headers."""
    from diffcli.checkpoint import model_metadata, read_header

    run_dir = ckpt if ckpt.is_dir() and (ckpt / "model.safetensors").exists() else None
    path = ckpt / "model.safetensors" if run_dir else ckpt
    header = read_header(path)
    if (header.get("__metadata__") or {}).get("format") == "diffcli-classifier":
        info = classifier_summary(header)
    else:
        info = summarize(header, model_metadata(header), path.stat().st_size)
    if run_dir:
        info.update(run_summary(run_dir))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(ckpt), show_header=False, title_justify="left")
    for key, value in info.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key.replace("_", " "), text)
    console.print(table)


def run_summary(run_dir: Path) -> dict:
    """The last metrics line and the latest pictures of a run folder."""
    from diffcli.plots import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    info = {}
    if records:
        last = records[-1]
        info.update({"last_step": last["step"], "last_loss": round(last["loss"], 5),
                     "images_per_s": round(last["images_per_s"], 1), "minutes_this_session": round(last["elapsed_s"] / 60, 1)})
    for key, name in (("latest_grid", "samples/latest.png"), ("loss_curve", "loss.png")):
        if (run_dir / name).exists():
            info[key] = str(run_dir / name)
    return info


def classifier_summary(header: dict) -> dict:
    from dataclasses import asdict

    from diffcli.classifier import classifier_metadata

    meta = classifier_metadata(header)
    return {"kind": "classifier", "dataset": meta["dataset"], **asdict(meta["config"]), "classes": meta["class_names"],
            "test_accuracy": meta["test_accuracy"], "per_class_accuracy": [None if a is None else round(a, 4) for a in meta["per_class_accuracy"]],
            "test_images": meta["test_images"]}


def summarize(header: dict, meta: dict, file_size: int) -> dict:
    cfg = meta["config"]
    m, d, t = cfg.get("model", {}), cfg.get("diffusion", {}), cfg.get("train", {})
    params, dtypes = 0, set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= dim
        params += count
        dtypes.add(entry.get("dtype", "?"))
    return {
        "kind": "diffusion model",
        "architecture": f"U-Net, {m.get('base_channels')} channels x {m.get('channel_mult')}, "
                        f"{m.get('num_res_blocks')} blocks/level, attention at levels {m.get('attn_levels')}",
        "preset": t.get("preset"),
        "parameters": params,
        "dtype": ", ".join(sorted(dtypes)),
        "image_size": m.get("image_size"),
        "channels": m.get("in_channels"),
        "classes": meta["class_names"] or "none (unconditional)",
        "schedule": d.get("schedule"),
        "timesteps": d.get("timesteps"),
        "prediction": d.get("prediction"),
        "training_step": meta["step"],
        "epochs": meta["epoch"],
        "ema_decay": t.get("ema_decay"),
        "dataset": cfg.get("data", {}).get("name"),
        "diffcli_version": meta["version"],
        "file_size": f"{file_size / 1e6:.1f} MB",
    }


def main() -> None:
    app()


if __name__ == "__main__":
    main()
