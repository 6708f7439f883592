"""`diffcli eval` and `diffcli classifier train`: options, one core call, tables."""

from __future__ import annotations

from pathlib import Path
from shlex import quote
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.checks import IMAGE_SIZE, POSITIVE, SEED, Range
from diffcli.cli._common import (AsJson, BatchSize, Ckpt, DataRoot, Device, Eta, Guidance, GuidanceInterval, ImageSeed, Sampler,
                                 Shift, Spacing, Steps, as_json_text, console, parse_interval, print_notice, safe_name, writing)
from diffcli.cli._progress import progress
from diffcli.cli._ranks import processes, where
from diffcli.errors import UserError, listed
from diffcli.spec import SamplerSpec, interval_text

# The real images a model's pictures are measured against: `eval`'s and `tune-guidance`'s.
RealData = Annotated[Optional[str], typer.Option(help="The real images to compare with (default: the model's training data).")]
RealDataRoot = Annotated[Optional[str], typer.Option(help="Where that dataset lives (default: as when the model was trained).")]
RealN = Annotated[Optional[int], typer.Option(help="Use only the first N real test images as the reference (default: all)."), Range(2)]


def evaluate(
    ckpt: Ckpt,
    classifier: Annotated[Optional[Path], typer.Option(help="A classifier from `diffcli classifier train`: class accuracy and classifier-FD.")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Also compute Inception-v3 FID against the test split (slow on a CPU).")] = False,
    inception_weights: Annotated[Optional[Path], typer.Option(help="The FID Inception weights file, if not in torch's hub cache.")] = None,
    memorisation: Annotated[bool, typer.Option("--memorisation/--no-memorisation", help="Distances to the nearest training images.")] = True,
    pairs: Annotated[Optional[Path], typer.Option(help="Write a contact sheet of the samples closest to a training image.")] = None,
    n: Annotated[int, typer.Option("--n", "--per-label", help="Images generated per class (under torchrun write --per-label: its launcher takes --n for --nnodes)."), Range(2, why="a covariance needs two images")] = 100,
    sampler: Sampler = "ddim",
    steps: Steps = None,
    spacing: Spacing = "trailing",
    shift: Shift = 1.0,
    eta: Eta = 0.0,
    guidance: Guidance = None,
    guidance_interval: GuidanceInterval = None,
    seed: ImageSeed = 0,
    data: RealData = None,
    data_root: RealDataRoot = None,
    real_n: RealN = None,
    batch_size: BatchSize = 250,
    device: Device = "auto",
    as_json: AsJson = False,
    log: Annotated[str, typer.Option(help="Also send the figures to the trackers of the run folder that holds --ckpt: tensorboard, wandb or both.")] = "none",
):
    """Measure a model's samples: class accuracy, classifier-FD, memorisation, and Inception FID."""
    from diffcli.evaluation import EvalOptions, run
    from diffcli.trackers import check_installed, log_eval, parse

    trackers = parse(log)
    check_installed(trackers)  # before minutes of sampling
    from diffcli.outputs import IMAGE, Output, check

    source = data or _trained_on(ckpt)  # without --data the real images are the model's own training data
    data_path = Path(source) if source and Path(source).exists() else None
    check({"--ckpt": ckpt, "--classifier": classifier, "--inception-weights": inception_weights, "--data": data_path},
          [Output("--pairs", pairs, IMAGE)])

    opts = EvalOptions(ckpt, SamplerSpec(sampler, steps, guidance, eta, spacing=spacing, interval=parse_interval(guidance_interval), shift=shift), n, seed, batch_size, classifier, fid, inception_weights,
                       memorisation, pairs, data, data_root, real_n)
    with processes(device) as (world, dev):  # under torchrun: the images drawn by every rank, measured by rank 0
        report = run(opts, dev, console.status, world)
    if not world.is_main:
        return
    report["device"] = where(dev, world)
    if trackers:
        log_eval(trackers, ckpt, report, print_notice)
    if as_json:
        print(as_json_text(report))
    else:
        _print_report(report)


def _print_report(report: dict) -> None:
    built_in = report.get("guidance_built_in")  # a distilled student's: it samples at 1 with its teacher's weight in it
    guidance = f"{report['guidance']:g}" if built_in is None else f"{built_in:g} built in"
    console.print(f"{report['images']:,} images from {report['model']}: {report['sampler']} {report['steps']} steps{_eta_text(report['eta'])}, "
                  f"guidance {guidance}{interval_text(report['guidance_interval'])}, seeds {report['seed']}.., {report['sampling_s']:.1f} s on {report['device']}",
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
    if "class_accuracy" in report and report["classifier_fd"] < report["classifier_fd_real_floor"]:
        # The small-n bias grows with a set's spread, so a less varied set can land under it (docs/evaluation.md).
        console.print(f"classifier-FD is below the real floor: at {report['images']:,} images it is mostly sample-size bias; "
                      "raise --n to compare models.", highlight=False)
    if "per_class_accuracy" in report:
        shown = ", ".join(f"{name} {'-' if acc is None else f'{acc:.0%}'}"
                          for name, acc in zip(report["class_names"], report["per_class_accuracy"]))
        console.print(f"class accuracy per class: {shown}", highlight=False)


def _eta_text(eta: float) -> str:
    return f", eta {eta:g}" if eta else ""  # deterministic DDIM, the usual case, says nothing


def _trained_on(ckpt: Path) -> str | None:
    """The --data a model was trained with, from its header; None where it cannot be read
    (the command then says why, in its own words)."""
    from diffcli.checkpoint import model_metadata, read_header

    try:
        return model_metadata(read_header(ckpt))["config"]["data"]["name"]
    except (UserError, KeyError, TypeError):
        return None


classifier_app = typer.Typer(help="Reference classifiers for `diffcli eval`.", no_args_is_help=True)


def classifier_train(
    data: Annotated[str, typer.Option(help="shapes, mnist, fashion-mnist, cifar10, or a folder of images (sub-folders = classes).")],
    data_root: DataRoot = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this size: the size of the models it will judge."), IMAGE_SIZE] = None,
    limit: Annotated[Optional[int], typer.Option(help="Train on only the first N training images (quick experiments)."), Range(1)] = None,
    out: Annotated[Optional[Path], typer.Option(help="The .safetensors file to write (default: DATA-classifier.safetensors).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training split (default: 10 for grey images, 16 for colour)."), POSITIVE] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step."), Range(1)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle: warm-up, then cosine to zero)."), POSITIVE] = 3e-3,
    width: Annotated[Optional[int], typer.Option(help="Channels at full resolution (default: 16)."), Range(1)] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and augmentation."), SEED] = 0,
    augment: Annotated[bool, typer.Option(help="Train on noisy, blurred and recoloured copies too, so that grain in "
                                               "generated images does not fool it (classifier.augment).")] = True,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
):
    """Train the classifier that `diffcli eval` uses to judge class fidelity; scores it on the test split."""
    from diffcli import data as D
    from diffcli.classifier import ClassifierConfig, reference_splits, save_classifier, train_classifier
    from diffcli.config import UNFLIPPED
    from diffcli.devices import describe, pick_device
    from diffcli.outputs import MODEL, Output, check, inside

    if out is None:
        source = None if data in D.NAMED else Path(data).expanduser().resolve()  # ("." has no name of its own)
        out = Path(f"{safe_name(source.name if source else data)}-classifier.safetensors")
        if source is not None and inside(out, source):  # run from inside the data: write beside it, never into it
            out = source.parent / out.name
    check({"--data": Path(data) if data not in D.NAMED else None}, [Output("--out", out, MODEL)], overwrite)
    dev = pick_device(device)
    with console.status(f"loading {data} ..."):
        train_data, test_data, held = reference_splits(data, data_root, image_size, limit)
    console.print(f"{data}: {len(train_data.labels):,} training images, {len(test_data.labels):,} test images ({held}); "
                  f"{describe(dev)}", highlight=False)
    seen = set(train_data.labels.tolist())
    if unseen := [name for i, name in enumerate(train_data.class_names) if i not in seen]:
        print_notice(f"no training image of the class(es) {listed(unseen)} (--limit?): the classifier cannot learn "
                     "them, and its figures will not judge a model's pictures of them.")
    with progress("classifier") as bar:
        task = bar.add_task("train", total=None, info="")

        def report(event, step, total, loss):
            if step % 20 == 0 or step == total:
                bar.update(task, total=total, completed=step, info=f"loss {loss:.3f}")

        model, scores = train_classifier(train_data, test_data, epochs, batch_size, lr, width or ClassifierConfig.width,
                                         seed, dev, report, augment, flip=data not in UNFLIPPED)
    with writing(out):
        save_classifier(out, model, train_data.class_names, data, scores, augment)
    console.print(f"test accuracy [bold]{scores['test_accuracy']:.2%}[/] on {scores['test_images']:,} images", highlight=False)
    table = Table(show_header=False)
    for name, acc in zip(train_data.class_names, scores["per_class_accuracy"]):
        table.add_row(name, "-" if acc is None else f"{acc:.2%}")
    console.print(table)
    console.print(f"wrote [cyan]{out}[/]; next: diffcli eval --ckpt MODEL --classifier {quote(str(out))}", highlight=False)
