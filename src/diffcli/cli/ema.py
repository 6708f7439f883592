"""`diffcli ema`: a model file for any EMA length, made after training from the run's snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.checks import Range
from diffcli.cli._common import console, parse_list
from diffcli.errors import UserError, writing


def ema(
    run: Annotated[Path, typer.Option(help="A run folder trained with EMA snapshots (train --ema-snapshot-every).")],
    length: Annotated[str, typer.Option(help="EMA lengths as EDM2's sigma_rel, the averaging window's width as a share "
                                             "of the run (e.g. 0.05, 0.1, 0.2); comma-separated for several.")],
    out: Annotated[Optional[Path], typer.Option(help="The model file to write, for one length "
                                                     "(default: RUN/ema-LENGTH.safetensors).")] = None,
):
    """Make the model that an EMA of another length would have given, without retraining
    (post-hoc EMA, Karras et al. 2024); sample or eval it like model.safetensors."""
    from diffcli import ema as E
    from diffcli import posthoc
    from diffcli.runs import run_config

    lengths = parse_list(length, float, "--length", Range(0, 0.28, low_open=True, why="a power-function EMA is at most 0.289 long"))
    if out is not None and len(lengths) > 1:
        raise UserError("--out names one file; give one --length with it, or leave --out out.")
    found = posthoc.snapshots(run)
    if found:
        cfg = run_config(run)
        console.print(f"{len(found)} snapshots, steps {min(found)}..{max(found)}; the run's own EMA ({cfg.train.ema_decay:g}) "
                      f"has length {E.classic_sigma_rel(max(found), cfg.train.ema_decay):.3f} at step {max(found)}", highlight=False)
    table = Table("length", "model file", "fit error", title_justify="left")
    for sigma_rel in lengths:
        path = out or run / f"ema-{sigma_rel:.3f}.safetensors"
        with writing(path):
            error = posthoc.write_model(run, sigma_rel, path)
        table.add_row(f"{sigma_rel:.3f}", str(path), f"{error:.2%}")
    console.print(table)
    console.print("fit error: how far the snapshots' best combination is from that EMA's weighting of the "
                  "steps (0%: exact; more snapshots bring it down).", highlight=False)
