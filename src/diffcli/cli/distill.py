"""`diffcli distill`: options, the student's config, one call to the distillation loop, progress."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli._common import DEVICE_HELP, LOG_HELP, WANDB_PROJECT_HELP, console, print_notice
from diffcli.cli._ranks import processes
from diffcli.cli._progress import with_progress
from diffcli.cli.train import _opt, config_values
from diffcli.config import DistillConfig, TrainConfig
from diffcli.errors import UserError


def distill(
    teacher: Annotated[Optional[Path], typer.Option(help="The model.safetensors of a `diffcli train` run: the model to distil.")] = None,
    steps: _opt(int, DistillConfig, "steps", f"Network evaluations per image the student is made for (default: {DistillConfig.steps}).") = None,
    guidance: _opt(float, DistillConfig, "guidance", "The teacher's guidance weight the student learns to draw with in one pass (default: the weight `sample` uses for the teacher).") = None,
    teacher_steps: _opt(int, DistillConfig, "teacher_steps", f"DDIM steps of the teacher's path the student learns (default: {DistillConfig.teacher_steps}).") = None,
    out: Annotated[Path, typer.Option(help="Run folder, as `diffcli train` writes it; model.safetensors is the student.")] = Path("runs/distilled"),
    config: Annotated[Optional[Path], typer.Option(help="YAML config: a distillation's config.yaml (its train and distill sections); options given here override it.")] = None,
    max_steps: _opt(int, TrainConfig, "max_steps", "Stop after this many optimizer steps (default: 1000 when --minutes is not set).") = None,
    minutes: _opt(float, TrainConfig, "minutes", "Wall-clock budget: stop cleanly, save and sample when it is spent.") = None,
    batch_size: _opt(int, TrainConfig, "batch_size", "Student images per step: batch / steps teacher paths (default: the teacher's batch).") = None,
    lr: _opt(float, TrainConfig, "lr", "Peak learning rate of AdamW (default: 5e-4).") = None,
    ema_decay: _opt(float, TrainConfig, "ema_decay", "EMA decay of the student's sampled weights (default: 0.995).") = None,
    sample_every: _opt(int, TrainConfig, "sample_every", "Steps between checkpoints and sample grids (default: 250).") = None,
    device: _opt(str, TrainConfig, "device", DEVICE_HELP) = None,
    seed: _opt(int, TrainConfig, "seed", f"Seed of the teacher paths' noise and labels (default: {TrainConfig.seed}).") = None,
    compile: _opt(bool, TrainConfig, "compile", "torch.compile the student (default: on for CUDA only).", "--compile/--no-compile") = None,
    precision: _opt(str, TrainConfig, "precision", "auto (bf16 on CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere), fp32, or bf16.") = None,
    log: _opt(str, TrainConfig, "log", LOG_HELP) = None,
    wandb_project: _opt(str, TrainConfig, "wandb_project", WANDB_PROJECT_HELP) = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the distillation in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an --out folder that holds another run.")] = False,
):
    """Distil a trained model into a student that samples in a few steps, guidance built in."""
    from diffcli.cli._logs import setup_logging

    setup_logging()
    values = config_values(distill, locals())
    from diffcli.config import RunConfig, apply_overrides, validate

    given = {s: {k: v for k, v in d.items() if v is not None} for s, d in values.items()}
    validate(apply_overrides(RunConfig(distill=DistillConfig()), given))  # a bad number: refused before any file is read
    cfg = _resumed(out, values, teacher) if resume else _configured(teacher, config, values)
    if cfg.distill.teacher_steps < cfg.distill.steps:
        untouched = "teacher_steps" not in given.get("distill", {}) and cfg.distill.teacher_steps == DistillConfig.teacher_steps
        default = ", the default" if untouched else ""
        raise UserError(f"--teacher-steps ({cfg.distill.teacher_steps}{default}) must be at least --steps ({cfg.distill.steps}): "
                        "the student learns the teacher's path cut into its own steps, so it needs as many at least.")
    from diffcli.trackers import check_installed, parse

    check_installed(parse(cfg.train.log))
    from diffcli.runs import claimed

    reads = {"--teacher": Path(cfg.distill.teacher), "--config": config}
    with processes(cfg.train.device) as (world, dev), \
            claimed(out, resume, overwrite, "diffcli distill", reads, print_notice, world.is_main):
        from diffcli.distill import distill as distill_loop
        from diffcli.distill import paths_per_step
        from diffcli.runlock import busy, holder_text

        if (holder := busy(Path(cfg.distill.teacher).parent)) is not None:
            print_notice(f"the teacher's run is still being written ({holder_text(holder)}): its model changes at each "
                         "checkpoint, and this distillation resumes only while the teacher stays as it is now.")
        d, paths = cfg.distill, paths_per_step(cfg.train.batch_size, cfg.distill.steps)
        console.print(f"teacher: [cyan]{d.teacher}[/]; student: ddim, {d.steps} steps, guidance {d.guidance:g} built in, "
                      f"from the teacher's {d.teacher_steps}-step guided DDIM path; {paths} paths a step "
                      f"({paths * d.steps} student images)", highlight=False)

        with_progress("distill", lambda report, should_stop: distill_loop(cfg, out, resume, report, should_stop, world, dev))


def _resumed(out: Path, values: dict, teacher: Optional[Path]):
    import logging

    from diffcli.runs import resumed, run_config

    cfg = resumed(run_config(out), values)
    if cfg.distill is None:
        raise UserError(f"'{out}' holds a training run, not a distillation; continue it with `diffcli train --resume`.")
    if teacher is not None and teacher.expanduser().resolve() != Path(cfg.distill.teacher).resolve():
        logging.getLogger("diffcli").warning("--resume continues with the run's own teacher '%s', so the --teacher given "
                                             "here is not used (start a new --out to distil another)", cfg.distill.teacher)
    return cfg


def _configured(teacher: Optional[Path], config: Optional[Path], values: dict):
    """The teacher's network < distillation defaults < the --config file < options."""
    from diffcli.config import load_yaml, to_dict, validate
    from diffcli.distill import configure, teacher_config

    file_values = load_yaml(config) if config else {}
    if not isinstance(file_values, dict):
        raise UserError(f"config file '{config}' must hold a mapping of sections.")
    teacher = teacher or (file_values.get("distill") or {}).get("teacher")
    if not teacher:
        raise UserError("give the model to distil: --teacher runs/NAME/model.safetensors.")
    theirs = to_dict(teacher_config(Path(teacher))[0])
    for section in ("model", "diffusion"):
        if file_values.get(section) not in (None, theirs[section]):
            raise UserError(f"config section '{section}' of '{config}' differs from the teacher's: a student keeps its "
                            f"teacher's network and schedule.")
    def pick(section: str) -> dict:
        return {**(file_values.get(section) or {}), **{k: v for k, v in values[section].items() if v is not None}}

    cfg = configure(Path(teacher), {k: v for k, v in pick("distill").items() if k not in ("teacher", "teacher_sha256")},
                    pick("train"))
    validate(cfg)
    return cfg
