"""`diffcli sample` and `diffcli compare`: options, one `SamplerSpec`, one core call, print."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.checks import AT_LEAST_ONE, SEED, Range
from diffcli.cli._common import (BatchSize, Ckpt, Device, Eta, Guidance, GuidanceInterval, ImageSeed, Sampler, Shift, Spacing, Steps,
                                 console, parse_interval, parse_labels, parse_list, print_notice, safe_name, writing)
from diffcli.cli._ranks import processes, where
from diffcli.errors import UserError
from diffcli.spec import DDIM_SAMPLERS, SamplerSpec


def sample(
    ckpt: Ckpt,
    label: Annotated[str, typer.Option(help="Class to draw: an index, a class name, several joined by commas, or all.")] = "all",
    n: Annotated[int, typer.Option("--n", "--per-label", help="Images per label (under torchrun write --per-label: its launcher takes --n for --nnodes)."), Range(1)] = 8,
    sampler: Sampler = "ddim",
    steps: Steps = None,
    eta: Eta = 0.0,
    guidance: Guidance = None,
    guidance_interval: GuidanceInterval = None,
    variance: Annotated[str, typer.Option(help="DDPM step variance: beta_tilde (posterior) or beta.")] = "beta_tilde",
    spacing: Spacing = "trailing",
    shift: Shift = 1.0,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip the predicted x0 to the data range at every step.")] = True,
    seed: ImageSeed = 0,
    out: Annotated[Path, typer.Option(help="The grid image to write (one row per label).")] = Path("samples.png"),
    save_individual: Annotated[Optional[Path], typer.Option(help="Also write every image as its own PNG into this folder.")] = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    trajectory: Annotated[Optional[Path], typer.Option(help="Also draw the denoising trajectory: a .png strip (x_t and predicted x0, one row per image) or a .gif animation.")] = None,
    frames: Annotated[int, typer.Option(help="Steps shown in --trajectory, evenly spaced."), Range(1, 100)] = 8,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the U-Net first: pays off for many images on a GPU.")] = False,
):
    """Generate images from a trained model."""
    if trajectory is not None and trajectory.suffix.lower() not in (".png", ".gif"):
        raise UserError(f"--trajectory must end in .png or .gif, got '{trajectory.name}'.")
    from diffcli.outputs import FOLDER, IMAGE, Output, check

    check({"--ckpt": ckpt}, [Output("--out", out, IMAGE), Output("--save-individual", save_individual, FOLDER),
                             Output("--trajectory", trajectory, IMAGE)])
    spec = SamplerSpec(sampler, steps, guidance, eta, variance, clip, spacing, parse_interval(guidance_interval), shift)
    with processes(device) as (world, dev):
        _sample(world, dev, ckpt, spec, label, n, seed, out, save_individual, batch_size, trajectory, frames, compile)


def _sample(world, dev, ckpt, spec, label, n, seed, out, save_individual, batch_size, trajectory, frames, compile) -> None:
    """`sample` in this process; under torchrun every rank draws its share of the images
    and rank 0 writes them all."""
    from diffcli.checkpoint import load_model
    from diffcli.devices import describe, timed
    from diffcli.figures import enlargement, trajectory_gif, trajectory_strip
    from diffcli.files import save_image
    from diffcli.generate import Trajectory, check_count, compiled_for_sampling, generate
    from diffcli.images import grid, to_pil
    from diffcli.objective import of

    if trajectory is not None and world.active:
        raise UserError("--trajectory is drawn by one process; run it without torchrun.")
    model, cfg, meta = load_model(ckpt, dev)
    objective = of(cfg.diffusion)
    spec = spec.resolve(objective.T, model.student, model.trained)
    labels = parse_labels(label, meta["class_names"])
    check_count(len(labels) * n, cfg.model.image_size)
    per_image = [lab for lab in labels for _ in range(n)]
    seeds = list(range(seed, seed + len(per_image)))
    if compile:
        with console.status(f"compiling the U-Net for {describe(dev)} ..."):
            model = compiled_for_sampling(model, objective, spec, labels=per_image, seeds=seeds,
                                          batch_size=batch_size, report=lambda event, message: print_notice(message))
    recorder = Trajectory(spec.steps, frames) if trajectory else None
    with console.status(f"sampling {len(per_image)} images with {spec.sampler}, {spec.steps} steps on {describe(dev)} ..."):
        imgs, seconds = timed(lambda: generate(model, objective, spec, labels=per_image, seeds=seeds,
                                               batch_size=batch_size, callback=recorder, world=world), dev)
    if not world.is_main:
        return
    picture = grid(imgs, n if len(labels) > 1 else math.ceil(n ** 0.5))  # one label: a square-ish grid
    with writing(out):
        save_image(picture, out)
    for i, (img, lab, s) in enumerate(zip(imgs, per_image, seeds) if save_individual else ()):
        tag = meta["class_names"][lab] if meta["class_names"] else "uncond"
        with writing(path := save_individual / f"{i:05d}_{safe_name(tag)}_seed{s}.png"):
            save_image(to_pil(img), path)
    if trajectory:
        strip = None if trajectory.suffix.lower() == ".gif" else trajectory_strip(
            recorder.xt, recorder.x0, recorder.timesteps, imgs, scale=enlargement(imgs))
        with writing(trajectory):
            trajectory_gif(recorder.xt, recorder.x0, imgs, trajectory) if strip is None else save_image(strip, trajectory)
    console.print(f"wrote [cyan]{out}[/]: {len(per_image)} images, {spec.describe(model.student)}, "
                  f"{seconds:.1f} s ({len(per_image) / seconds:.1f} images/s) on {where(dev, world)}", highlight=False)
    if trajectory:
        console.print(f"trajectory: [cyan]{trajectory}[/] (t = {', '.join(map(str, recorder.timesteps))})", highlight=False)


def compare(
    ckpt: Ckpt,
    samplers: Annotated[str, typer.Option(help="Comma-separated samplers, one row each.")] = "ddpm,ddim,dpm++",
    steps: Annotated[str, typer.Option(help="Comma-separated step counts, one column each (ddpm always runs all T).")] = "10,20,50",
    guidance: Annotated[Optional[str], typer.Option(help="Comma-separated guidance weights, a row each per sampler (default: the model's own, as sample).")] = None,
    label: Annotated[str, typer.Option(help="The class to draw (index or name).")] = "0",
    n: Annotated[int, typer.Option(help="Images per cell."), Range(1, 64)] = 4,
    seed: Annotated[int, typer.Option(help="Seeds SEED..SEED+n-1: the same starting noise in every cell."), SEED] = 0,
    out: Annotated[Path, typer.Option(help="The contact sheet to write.")] = Path("compare.png"),
    device: Device = "auto",
):
    """Contact sheet of samplers x steps (x guidance) from the same starting noise, each cell timed."""
    first: dict[str, str] = {}  # each sampler once, as each step count (ddim and euler: one sampler, two names)
    for name in parse_list(samplers, str, "--samplers"):
        first.setdefault("ddim" if name in DDIM_SAMPLERS else name, name)
    names = list(first.values())
    step_list = parse_list(steps, int, "--steps", AT_LEAST_ONE)
    weights = list(dict.fromkeys(parse_list(guidance, float, "--guidance"))) if guidance else [None]
    rows = [(s, w) for s in names for w in weights]
    specs = {(s, w): SamplerSpec(s, guidance=w) for s, w in rows}  # refuses a bad sampler or weight now
    from diffcli.outputs import IMAGE, Output, check

    check({"--ckpt": ckpt}, [Output("--out", out, IMAGE)])

    from diffcli.checkpoint import load_model
    from diffcli.devices import describe, pick_device
    from diffcli.figures import sweep_sheet
    from diffcli.generate import sweep
    from diffcli.files import save_image
    from diffcli.objective import of

    dev = pick_device(device)
    model, cfg, meta = load_model(ckpt, dev)
    if model.student is not None:
        raise UserError(f"'{ckpt}' is a distilled student: it draws only with its own {model.student.steps} DDIM steps, so there "
                        "is nothing to compare; draw it with `diffcli sample`, or compare its teacher.")
    labels = parse_labels(label, meta["class_names"])
    if len(labels) > 1:
        raise UserError(f"--label names {len(labels)} classes, and compare draws one; run it once for each.")
    T = cfg.diffusion.timesteps
    for k in step_list:
        SamplerSpec(steps=k).resolve(T, model.student, model.trained)  # every step count must fit this model, whichever rows use it
    auto = SamplerSpec().resolve(T, model.student, model.trained).guidance  # the weight `sample` would use
    columns = sorted(set(step_list) | ({T} if "ddpm" in names else set()))
    # A cell for each (row, column) the sampler can run: ddpm only in the T column.
    cells = {(s, w, k): replace(specs[s, w], steps=k).resolve(T, model.student, model.trained) for s, w in rows for k in columns
             if (k == T if s == "ddpm" else k in step_list)}
    lab = labels[0]
    seeds = list(range(seed, seed + n))
    with console.status(f"sampling {len(cells)} cells of {n} images on {describe(dev)} ..."):
        results = dict(zip(cells, sweep(model, of(cfg.diffusion), list(cells.values()), label=lab, seeds=seeds)))
    sheet = sweep_sheet([[results.get((s, w, k)) for k in columns] for s, w in rows],
                        [[f"{s} {k} steps w={auto if w is None else w:g}" for k in columns] for s, w in rows],
                        ["ddpm runs all T steps" if s == "ddpm" else "" for s, _ in rows])
    with writing(out):
        save_image(sheet, out)
    name = meta["class_names"][lab] if meta["class_names"] else "unconditional"
    console.print(f"wrote [cyan]{out}[/]: {len(rows)} rows x {len(columns)} columns, label {name}, seeds {seed}..{seed + n - 1}",
                  highlight=False)
