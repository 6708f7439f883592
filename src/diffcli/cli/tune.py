"""`diffcli tune-guidance`: options, one core call (tuning.tune), the table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.checks import NON_NEGATIVE, Range
from diffcli.cli._common import (AsJson, as_json_text, BatchSize, Ckpt, Device, Eta, ImageSeed, Sampler, Shift, Spacing, Steps, console,
                                 parse_list, print_notice)
from diffcli.cli._ranks import processes, where
from diffcli.cli.evaluate import RealData, RealDataRoot, RealN
from diffcli.errors import UserError
from diffcli.spec import SamplerSpec
from diffcli.tuning import SEED, WEIGHTS

_DEFAULT_WEIGHTS = ",".join(f"{w:g}" for w in WEIGHTS)


def tune_guidance(
    ckpt: Ckpt,
    classifier: Annotated[Path, typer.Option(help="A classifier from `diffcli classifier train` on the model's data, "
                                                  "trained for its default epochs: it scores the pictures of each weight.")],
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated guidance weights to try, in rising order until two are "
                                                        "worse than the best; the model's current weight is always tried too "
                                                        f"(default: {_DEFAULT_WEIGHTS}, and on past 3.5 in steps of 0.5, up to 8, "
                                                        "while the best is the highest).")] = None,
    n: Annotated[int, typer.Option("--n", "--per-label", help="Images drawn per class at each weight."),
                 Range(2, why="a covariance needs two images")] = 100,
    sampler: Sampler = "ddim",
    steps: Steps = None,
    spacing: Spacing = "trailing",
    shift: Shift = 1.0,
    eta: Eta = 0.0,
    seed: ImageSeed = SEED,
    data: RealData = None,
    data_root: RealDataRoot = None,
    real_n: RealN = None,
    store: Annotated[bool, typer.Option("--store/--no-store", help="Write the chosen weight into the model file, where "
                                                                  "sample, eval, compare, distill and export take it as the default.")] = True,
    batch_size: BatchSize = 250,
    device: Device = "auto",
    as_json: AsJson = False,
):
    """Choose a model's guidance weight with your classifier: draw the same seeds at each weight,
    keep the one of the lowest classifier-FD, and store it in the model file."""
    tried = tuple(dict.fromkeys(parse_list(weights, float, "--weights", NON_NEGATIVE))) if weights else None  # (before torch loads)
    from diffcli.evaluation import EvalOptions
    from diffcli.tuning import TuneOptions, tune

    spec = SamplerSpec(sampler, steps, None, eta, spacing=spacing, shift=shift)
    opts = TuneOptions(EvalOptions(ckpt, spec, n, seed, batch_size, classifier, data=data, data_root=data_root, real_n=real_n),
                       tried, store)
    with processes(device) as (world, dev):
        if world.active:  # each weight's figure decides the next: one process measures them all
            raise UserError("tune-guidance runs in one process; run it without torchrun.")
        report = tune(opts, dev, console.status)
    report["device"] = where(dev, world)
    if as_json:
        print(as_json_text(report))
        return
    _print_report(report, ckpt)


def _ratio(row: dict) -> str:
    floor = row["classifier_fd_real_floor"]
    return f"{row['classifier_fd'] / floor:.2f}" if floor > 0 else "-"


def _print_report(report: dict, ckpt: Path) -> None:
    console.print(f"{report['images_per_weight']:,} images a weight ({report['sampler']} {report['steps']} steps, seeds "
                  f"{report['seed']}..) from {report['model']}, scored by {report['classifier']['path']} "
                  f"({report['classifier']['test_accuracy']:.2%} on real test images), on {report['device']}", highlight=False)
    table = Table(show_header=True, title_justify="left")
    for name in ("weight", "accuracy", "classifier-FD", "x floor", "s", ""):
        table.add_column(name, justify="left" if name in ("", "weight") else "right")
    for row in report["rows"]:
        w = row["guidance"]
        notes = [n for n, on in (("chosen", w == report["chosen"]), ("the rule's", w == report["rule"]),
                                 ("tuned before", w == report["previous"])) if on]
        table.add_row(f"{w:g}", f"{row['class_accuracy']:.1%}", f"{row['classifier_fd']:.3f}",
                      _ratio(row), f"{row['sampling_s']:.0f}", ", ".join(notes))
    console.print(table)
    chosen = f"{report['chosen']:g}"
    tried = [row["guidance"] for row in report["rows"]]
    edge = "highest" if report["chosen"] == max(tried) else "lowest" if report["chosen"] == min(tried) > 1 else None
    if len(tried) > 1 and edge:  # (below 1 the label fades: worth trying only past a valley's floor at 1)
        print_notice(f"{chosen} is the {edge} weight tried; one beyond it may draw better still (--weights).")
    if report["stored"]:
        console.print(f"stored guidance {chosen} in [cyan]{ckpt}[/]: sample, eval, compare, distill and export now use it "
                      "unless --guidance is given (`diffcli inspect` shows it).", highlight=False)
    else:
        console.print(f"best guidance {chosen}; not stored (--no-store): pass --guidance {chosen} to sample with it.", highlight=False)
