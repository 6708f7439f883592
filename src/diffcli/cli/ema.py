"""`diffcli ema`: a model file for any EMA length, made after training from the run's snapshots."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.checks import Range
from diffcli.cli._common import console, parse_list, print_notice
from diffcli.errors import UserError

# Above 0.28 the power-function EMA (longest at γ = 0: 0.289) changes little with σ_rel.
LENGTHS = Range(0, 0.28, low_open=True, why="longer power-function EMAs hardly differ")


def ema(
    run: Annotated[Path, typer.Option(help="A run folder trained with EMA snapshots (train --ema-snapshot-every N).")],
    length: Annotated[str, typer.Option(help="EMA lengths as EDM2's sigma_rel, the averaging window's width as a share "
                                             "of the run (e.g. 0.05, 0.1, 0.2); comma-separated for several.")],
    out: Annotated[Optional[Path], typer.Option(help="The model file to write, for one length "
                                                     "(default: RUN/ema-LENGTH.safetensors).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace model files that exist.")] = False,
):
    """Make the model that an EMA of another length would have given, without retraining
    (post-hoc EMA, Karras et al. 2024); sample or eval it like model.safetensors."""
    from diffcli import checkpoint, outputs, posthoc
    from diffcli import ema as E
    from diffcli.runlock import holding
    from diffcli.runs import MODEL_FILE, SNAPSHOT_DIR, STATE_FILE

    lengths = parse_list(length, float, "--length", LENGTHS)
    if twice := sorted({x for x in lengths if lengths.count(x) > 1}):
        raise UserError(f"--length gives {', '.join(f'{x:g}' for x in twice)} more than once; give each length once.")
    if out is not None and len(lengths) > 1:
        raise UserError("--out names one file; give one --length with it, or leave --out out.")
    if not (run / MODEL_FILE).is_file():
        holds = f"is a file; give the run folder that holds it ('{run.parent}')" if run.is_file() else f"is not a run folder (no {MODEL_FILE} in it)"
        raise UserError(f"'{run}' {holds}.")
    paths = [out] if out is not None else [posthoc.made_path(run, s) for s in lengths]
    outputs.check({"run's model": run / MODEL_FILE, "run's training state": run / STATE_FILE,
                   "run's EMA snapshots": run / SNAPSHOT_DIR}, [outputs.Output("--out", p, outputs.MODEL) for p in paths],
                  overwrite)
    into_run = any(outputs.inside(p, run) for p in paths)
    with holding(run, "diffcli ema", print_notice) if into_run else contextlib.nullcontext():  # not while a run writes it
        made = posthoc.write_models(run, lengths, paths)
    meta = checkpoint.model_metadata(checkpoint.read_header(made[0][0]))
    found = list(posthoc.used(run, meta["step"]))
    decay = meta["config"]["train"]["ema_decay"]
    console.print(f"{len(found)} snapshots, steps {found[0]}..{found[-1]}; the run's own EMA ({decay:g}) has length "
                  f"{E.classic_sigma_rel(meta['step'], decay):.3f} at step {meta['step']}", highlight=False)
    table = Table("length", "model file", "fit error", title_justify="left")
    for sigma_rel, (path, error) in zip(lengths, made):
        table.add_row(f"{sigma_rel:g}", str(path), f"{error:.2%}")
    console.print(table)
    console.print("fit error: how far the snapshots' best combination is from that EMA's weighting of the "
                  "steps (0%: exact; more snapshots bring it down).", highlight=False)
