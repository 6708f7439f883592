"""The run folder: its layout, the refusal to mix two runs in one, what a resume reads
(what `diffcli inspect` prints of it lives in inspection.py).

    runs/NAME/model.safetensors        EMA weights + config: enough to sample
              train_state.safetensors  everything `--resume` needs (trainstate.py)
              config.yaml              the resolved config, accepted back by --config
              metrics.jsonl            a loss line per LOG_EVERY steps; a line per label reading
              samples/step_*.png       one grid per checkpoint; samples/latest.png
              ema_snapshots/step_*     post-hoc EMA profiles, with --ema-snapshot-every (posthoc.py)
              loss.png                 the loss curve (with the plots extra)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
from pathlib import Path

from diffcli import checkpoint, outputs, runlock
from diffcli.config import RunConfig, apply_overrides, from_dict, validate
from diffcli.errors import UserError
from diffcli.files import MODEL_FILE, STATE_FILE, atomic_write_bytes

log = logging.getLogger("diffcli")

METRICS_FILE = "metrics.jsonl"
SNAPSHOT_DIR = "ema_snapshots"
_SNAPSHOT_NAME = re.compile(r"step_(\d+)\.safetensors")


@contextlib.contextmanager
def claimed(out: Path, resume: bool, overwrite: bool, command: str, reads: dict, notice=lambda message: None,
            main: bool = True):
    """The run folder, apart from what the run `reads` (outputs.check), locked for this run
    until the body ends (runlock.py) and checked by `prepare_out` under the lock, so two
    runs started together cannot both pass it. Only the `main` process (rank 0, the one
    that writes) claims it."""
    if not main:
        yield
        return
    outputs.check(reads, [outputs.Output("--out", out, outputs.FOLDER)])
    with runlock.holding(out, command, notice):
        prepare_out(out, resume, overwrite)
        yield


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


def state_path(out: Path) -> Path:
    path = out / STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: '{path}' does not exist (is '{out}' a diffcli run folder?).")
    return path


def run_config(out: Path) -> RunConfig:
    """The config a run was trained with, from its training state's header (no weights read)."""
    return from_dict(checkpoint.model_metadata(checkpoint.read_header(state_path(out)))["config"])


STOP_KEYS = ("epochs", "max_steps", "minutes")
RUN_ON_KEYS = ("device", "compile", "precision", "log", "wandb_project")


def resumed(saved: RunConfig, values: dict) -> RunConfig:
    """The config a resumed run continues with: its own recipe, where only where to stop
    (a new limit replaces all the old ones) and where and how to run may change. The other
    values given are still checked, so a bad one is refused rather than silently ignored."""
    given = {s: {k: v for k, v in d.items() if v is not None} for s, d in values.items()}
    validate(apply_overrides(copy.deepcopy(saved), given))
    kept = [OPTION_OF.get((s, k), f"--{k.replace('_', '-')}") for s, d in given.items() for k, v in d.items()
            if k not in STOP_KEYS + RUN_ON_KEYS and (s, k) != DATA_ROOT and not _same_value(s, k, v, getattr(getattr(saved, s), k, v))]
    if kept:
        log.warning("--resume continues the run's own recipe, so %s given here %s not used (start a new --out to "
                    "change the recipe)", ", ".join(kept), "is" if len(kept) == 1 else "are")
    stop = {k: values["train"][k] for k in STOP_KEYS if values["train"].get(k) is not None}
    if stop:
        saved.train.epochs = saved.train.max_steps = saved.train.minutes = None
    run_on = {k: values["train"][k] for k in RUN_ON_KEYS if values["train"].get(k) is not None}
    if values["data"].get("root") is not None:  # where the data lives now (moved, or found through DIFFCLI_DATA_ROOT before)
        saved.data.root = str(Path(values["data"]["root"]).expanduser().resolve())
    apply_overrides(saved, {"train": {**stop, **run_on}})
    validate(saved)
    return saved


PATH_KEYS = {("data", "name"), ("data", "root")}  # stored absolute, given as the user wrote them
DATA_ROOT = ("data", "root")  # not the recipe but where the data is: a resume may name another
OPTION_OF = {("data", "name"): "--data", DATA_ROOT: "--data-root"}  # the config keys whose option is named otherwise


def _same_value(section: str, key: str, given, saved) -> bool:
    if (section, key) in PATH_KEYS and isinstance(given, str) and isinstance(saved, str):
        return Path(given).expanduser().resolve() == Path(saved).expanduser().resolve()  # a path, as given or absolute
    return given == saved or (isinstance(saved, tuple) and tuple(given) == saved)


def snapshots(out: Path) -> dict[int, Path]:
    """The run's post-hoc EMA snapshots (posthoc.py) by step."""
    folder = out / SNAPSHOT_DIR
    found = (_SNAPSHOT_NAME.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return dict(sorted((int(m.group(1)), folder / m.group(0)) for m in found if m))


def checkpoint_bytes(params: int, profiles: int = 0) -> int:
    """Disk a run needs at least: train_state (weights, EMA, two Adam moments, the post-hoc
    EMA profiles) + the model file, each written beside its predecessor before the rename,
    plus room for grids (EMA snapshots come on top: 4 bytes per parameter and profile each)."""
    return 2 * (4 + profiles + 1) * 4 * params + 50_000_000


def check_free_space(out: Path, params: int, profiles: int = 0) -> None:
    need, free = checkpoint_bytes(params, profiles), shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"only {free / 1e6:.0f} MB free in '{out}', and this run's checkpoints need about "
                        f"{need / 1e6:.0f} MB; free some space or choose another --out.")


def append_metrics(out: Path, record: dict) -> None:
    """One line of metrics.jsonl: a loss line (fitting.Meter) or a label reading."""
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint we continue from (and a last
    line a kill cut short, which `read_metrics` skips)."""
    from diffcli.plots import read_metrics

    path = out / METRICS_FILE
    if path.exists():
        keep = [json.dumps(r) + "\n" for r in read_metrics(path, checked=False)  # (a line inspect cannot use is kept as it was)
                if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
        atomic_write_bytes(path, "".join(keep).encode())


def absolute_data_paths(cfg: RunConfig, named: tuple[str, ...]) -> None:
    """Write data paths as absolute paths, so `--resume` and `--config` work from any
    folder (a relative folder name would be looked up where the command runs)."""
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.name not in named:
        cfg.data.name = str(Path(cfg.data.name).expanduser().resolve())
