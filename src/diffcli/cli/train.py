"""`diffcli train`: options, the run's config, one call to the training loop, progress."""

import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.cli._common import (DATA_ROOT_HELP, DEVICE_HELP, LOG_HELP, WANDB_PROJECT_HELP, Sets, console, err_console,
                                 print_notice)
from diffcli.cli._logs import setup_logging
from diffcli.cli._progress import with_progress
from diffcli.cli._ranks import processes
from diffcli.config import DataConfig, DiffusionConfig, TrainConfig
from diffcli.errors import UserError, listed


def _opt(kind, cls, name: str, help: str, *decls: str):
    """The type of an option that sets config field `name` of section `cls`, with that
    field's own bounds (config.validate checks them, naming the key)."""
    return Annotated[Optional[kind], typer.Option(*decls, help=help), Sets(cls, name)]


def train(
    data: _opt(str, DataConfig, "name", "shapes (built in, no download), mnist, fashion-mnist, cifar10, or a folder of images (sub-folders = classes).") = None,
    data_root: _opt(str, DataConfig, "root", DATA_ROOT_HELP) = None,
    image_size: _opt(int, DataConfig, "image_size", "Resize images to this size (default: the dataset's own).") = None,
    limit: _opt(int, DataConfig, "limit", "Use only the first N images (quick experiments).") = None,
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, train_state, config.yaml, metrics.jsonl, samples/.")] = Path("runs/latest"),
    preset: Annotated[Optional[str], typer.Option(help="Model size: auto (the default: small on a CPU, base on a GPU), tiny (tests), small (1.2M, minutes on a CPU), base (DDPM CIFAR-10, 35.7M).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (the same format as a run's config.yaml); options given here override it.")] = None,
    epochs: _opt(float, TrainConfig, "epochs", "Stop after this many passes over the data (default: 10 when no other limit is set).") = None,
    max_steps: _opt(int, TrainConfig, "max_steps", "Stop after this many optimizer steps.") = None,
    minutes: _opt(float, TrainConfig, "minutes", "Wall-clock budget: stop cleanly, save and sample when it is spent.") = None,
    batch_size: _opt(int, TrainConfig, "batch_size", "Images per step (default: preset).") = None,
    lr: _opt(float, TrainConfig, "lr", "Peak learning rate of AdamW (default: preset).") = None,
    lr_schedule: _opt(str, TrainConfig, "lr_schedule", "constant or cosine (after warm-up).") = None,
    warmup_steps: _opt(int, TrainConfig, "warmup_steps", "Linear learning-rate warm-up steps (default: preset).") = None,
    ema_decay: _opt(float, TrainConfig, "ema_decay", "EMA decay of the weights used for sampling (default: preset).") = None,
    ema_snapshot_every: _opt(int, TrainConfig, "ema_snapshot_every", "Save the post-hoc EMA profiles every N steps, for `diffcli ema` (0: off; default: preset).") = None,
    label_dropout: _opt(float, TrainConfig, "label_dropout", f"Share of labels dropped, for classifier-free guidance (default: {TrainConfig.label_dropout:g}).") = None,
    min_snr_gamma: _opt(float, TrainConfig, "min_snr_gamma", f"Min-SNR-γ loss weighting; 0 = plain MSE (default: {TrainConfig.min_snr_gamma:g}).") = None,
    grad_clip: _opt(float, TrainConfig, "grad_clip", f"Clip the gradient norm at this value; 0 turns clipping off (default: {TrainConfig.grad_clip:g}).") = None,
    timesteps: _opt(int, DiffusionConfig, "timesteps", f"Diffusion steps T (default: {DiffusionConfig.timesteps}).") = None,
    schedule: _opt(str, DiffusionConfig, "schedule", f"Noise schedule: linear or cosine (default: {DiffusionConfig.schedule}).") = None,
    prediction: _opt(str, DiffusionConfig, "prediction", f"What the network predicts: v or eps (default: {DiffusionConfig.prediction}).") = None,
    objective: _opt(str, DiffusionConfig, "objective", f"What is learned: ddpm (eps or v on T noise steps) or flow (flow matching: the velocity of the straight path from data to noise) (default: {DiffusionConfig.objective}).") = None,
    time_sampling: _opt(str, DiffusionConfig, "time_sampling", f"Flow matching's training times: logit-normal (SD3) or uniform (default: {DiffusionConfig.time_sampling}).") = None,
    flip: _opt(bool, DataConfig, "flip", "Random horizontal flips (default: on for cifar10 and folders).", "--flip/--no-flip") = None,
    on_nonfinite: _opt(str, TrainConfig, "on_nonfinite", "When the loss becomes NaN/inf: stop (keep the last checkpoint) or rollback (to the last good state, halving the LR) (default: stop).") = None,
    sample_every: _opt(int, TrainConfig, "sample_every", "Steps between checkpoints and sample grids (default: preset).") = None,
    device: _opt(str, TrainConfig, "device", DEVICE_HELP) = None,
    seed: _opt(int, TrainConfig, "seed", f"Seed for initialisation, data order and noise (default: {TrainConfig.seed}).") = None,
    compile: _opt(bool, TrainConfig, "compile", "torch.compile the U-Net: faster steps after a minute or so of compiling (default: on for CUDA only).", "--compile/--no-compile") = None,
    precision: _opt(str, TrainConfig, "precision", "auto (bf16 on CUDA and on CPUs with AMX or AVX512-BF16, where it is faster; fp32 elsewhere), fp32, or bf16.") = None,
    log: _opt(str, TrainConfig, "log", LOG_HELP) = None,
    wandb_project: _opt(str, TrainConfig, "wandb_project", WANDB_PROJECT_HELP) = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an --out folder that holds another run.")] = False,
):
    """Train a class-conditional diffusion model."""
    setup_logging()
    from diffcli import config as C
    from diffcli.data import NAMED
    from diffcli.devices import pick_device, preset_for
    from diffcli.runs import absolute_data_paths, resumed, run_config

    values = config_values(train, locals())
    if resume:
        if preset not in (None, "auto"):
            values["train"]["preset"] = preset  # so that a different one is named as not used
        if config is not None:
            print_notice(f"--config is not read with --resume: the run continues its own recipe ({out / 'config.yaml'}).")
        cfg = resumed(run_config(out), values)
    else:
        cfg = C.build_config(preset, str(config) if config else None, values, lambda name: preset_for(pick_device(name)))
        absolute_data_paths(cfg, NAMED)
    if cfg.distill is not None:
        where = f"'{out}' holds" if resume else f"'{config}' describes"
        raise UserError(f"{where} a distillation; run it with `diffcli distill` (--resume or --config).")
    from diffcli.trackers import check_installed, parse

    check_installed(parse(cfg.train.log))  # before any data is read
    _run(cfg, out, resume, overwrite, config)


def config_values(fn, given: dict) -> dict:
    """{section: {key: value}} of the options of `fn` that set a config field (`Sets`)."""
    from diffcli.config import SECTIONS

    section_of = {cls: name for name, cls in SECTIONS.items()}
    values: dict = {name: {} for name in SECTIONS}
    for param, hint in typing.get_type_hints(fn, include_extras=True).items():
        mark = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Sets)), None)
        if mark is not None:
            values[section_of[mark.cls]][mark.name] = given[param]
    return values


def _run(cfg, out: Path, resume: bool, overwrite: bool, config: Path | None) -> None:
    from diffcli import data as D
    from diffcli import distributed
    from diffcli.config import fit_to_data
    from diffcli.runs import claimed
    from diffcli.trainstate import check_classes

    reads = {"--data": Path(cfg.data.name) if cfg.data.name not in D.NAMED else None, "--config": config}
    with processes(cfg.train.device) as (world, device), \
            claimed(out, resume, overwrite, "diffcli train", reads, print_notice, world.is_main):
        # Rank 0 loads first (it may extract archives); the others then read what it left.
        for turn in (True, False):
            if world.is_main == turn:
                with console.status(f"loading {cfg.data.name} ..."):
                    data = D.load(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.limit)
            distributed.barrier(world)
        if resume:
            check_classes(out, data.class_names)
        _, c, h, _ = data.images.shape
        fit_to_data(cfg, c, h, data.num_classes)
        _print_dataset(data)
        _train_with_progress(cfg, data, out, resume, world, device)


def _train_with_progress(cfg, data, out, resume, world, device) -> None:
    from diffcli.training import train as train_loop

    with_progress("train", lambda report, should_stop: train_loop(cfg, data, out, resume, report, should_stop=should_stop,
                                                                  world=world, device=device))


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
        if empty := [name for name, k in zip(data.class_names, counts) if k == 0]:  # unreadable files, or --limit
            err_console.print(f"[yellow]warning:[/] no training image of the class(es) {listed(empty)} (unreadable "
                              "files, or --limit): the model will not learn to draw them.")
        elif min(counts) * 2 < max(counts):
            err_console.print(f"[yellow]warning:[/] classes are unbalanced ({min(counts)} to {max(counts)} images).")
    else:
        table.add_row("classes", "none (unconditional)")
    if data.origin:
        table.add_row("loaded", data.origin)
    console.print(table)
    if n < 1000:
        err_console.print(f"[yellow]warning:[/] only {n} images: a diffusion model this size may memorise them.")
