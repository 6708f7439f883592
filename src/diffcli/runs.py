"""The run folder: its layout, the refusal to mix two runs in one, what a resume reads,
and the summaries `diffcli inspect` prints of a run folder or a checkpoint file.

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
from shlex import quote

from diffcli import checkpoint, outputs, runlock
from diffcli.checks import is_number
from diffcli.config import RunConfig, apply_overrides, from_dict, validate
from diffcli.errors import UserError
from diffcli.files import MODEL_FILE, STATE_FILE, atomic_write_bytes
from diffcli.spec import default_guidance

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


# --- what `diffcli inspect` shows ---------------------------------------------------

def describe_file(path: Path) -> dict:
    """What a .safetensors file written by diffcli holds, from its header alone."""
    header = checkpoint.read_header(path)
    kind = checkpoint.file_kind(header)
    if kind == "classifier":
        return classifier_summary(header)
    meta = header.get("__metadata__") or {}
    if kind == "EMA snapshot":
        try:
            step, lengths = int(meta.get("step", 0)), json.loads(meta.get("sigma_rels", "[]"))
        except (TypeError, ValueError):
            raise UserError(f"'{path}' is a diffcli EMA snapshot whose metadata is damaged.") from None
        return {"kind": "EMA snapshot (post-hoc EMA, Karras et al. 2024)", "training_step": step, "ema_lengths": lengths,
                "file_size": f"{path.stat().st_size / 1e6:.1f} MB",
                "use": "diffcli ema --run RUN --length L makes a model from a run's snapshots"}
    if kind == "training state":  # described by the EMA weights it holds: what its model file holds too
        weights = {k[4:]: v for k, v in header.items() if k.startswith("ema.")}
        info = model_summary({**weights, "__metadata__": meta}, checkpoint.model_metadata(header), path.stat().st_size)
        return {**info, "kind": "training state (the weights, their EMA, the optimizer and random state)",
                "use": "diffcli train --out RUN --resume continues from it; sample the model.safetensors beside it"}
    return model_summary(header, checkpoint.model_metadata(header), path.stat().st_size)


def describe(target: Path) -> dict:
    """`describe_file` of a checkpoint, or of a run folder's model plus its last metrics."""
    if target.is_dir() and (target / MODEL_FILE).exists():
        return {**describe_file(target / MODEL_FILE), **run_summary(target)}
    return describe_file(target)


def run_summary(run_dir: Path) -> dict:
    """The last loss line of metrics.jsonl, its label readings, and the latest pictures of a run folder."""
    from diffcli.plots import read_metrics

    records = read_metrics(run_dir / METRICS_FILE)
    losses = [r for r in records if "loss" in r]
    labels = [r for r in records if "label_knowledge" in r]
    info = {}
    if losses:
        last = losses[-1]
        info.update({"last_step": last["step"], "last_loss": round(last["loss"], 5),
                     "images_per_s": round(last["images_per_s"], 1), "minutes_this_session": round(last["elapsed_s"] / 60, 1)})
    if labels:  # how the label knowledge and gain moved, each reading: "step: knowledge / gain"
        info["label_readings"] = ", ".join(f"{r['step']:,}: {r['label_knowledge']:.2f}"
                                           + ("" if r.get("label_gain") is None else f" / {r['label_gain']:.3f}") for r in labels)
    if found := snapshots(run_dir):
        size = sum(p.stat().st_size for p in found.values())
        info["ema_snapshots"] = f"{len(found)}, {size / 1e6:.0f} MB (diffcli ema --run {quote(str(run_dir))} --length L)"
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
            "test_images": meta["test_images"], "augmented": meta["augmented"],
            **({"epochs": meta["epochs"]} if meta["epochs"] is not None else {})}  # (older files do not say)


def model_summary(header: dict, meta: dict, file_size: int) -> dict:
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
        **_objective(d),
        "timesteps": d.get("timesteps"),
        "training_step": meta["step"],
        **({} if cfg.get("distill") else {"epochs": meta["epoch"]}),  # a distillation sees no data
        "ema_decay": t.get("ema_decay"),
        "dataset": cfg.get("data", {}).get("name"),
        **(_distilled(cfg.get("distill")) or _guidance(cfg, meta)),
        "diffcli_version": meta["version"],
        "file_size": f"{file_size / 1e6:.1f} MB",
    }


def _objective(d: dict) -> dict:
    """What the model learned: flow matching's time sampling, or ddpm's schedule and target."""
    if d.get("objective") == "flow":
        return {"objective": "flow matching (predicts the velocity)", "time_sampling": d.get("time_sampling")}
    return {"objective": "ddpm", "schedule": d.get("schedule"), "prediction": d.get("prediction")}


def _guidance(cfg: dict, meta: dict) -> dict:
    """The weight `sample` uses by default for this model, and why (spec.default_guidance)."""
    if not meta["class_names"]:
        return {}
    if tuned := meta.get("tuned_guidance"):  # chosen by measurement (tuning.py): say by what
        fd = tuned.get("classifier_fd") or {}
        scores = ", ".join(f"{w} {v:.3g}" if is_number(v) else f"{w} ?" for w, v in fd.items()) if isinstance(fd, dict) else "?"
        how = ", ".join(str(tuned[k]) for k in ("sampler", "steps") if k in tuned)
        rule = f"{tuned['rule']:g}" if is_number(tuned.get("rule")) else "?"
        return {"default_guidance": f"{tuned['weight']:g} (tuned with {tuned.get('classifier', '?')} on {how or '?'}, "
                                    f"{tuned.get('images_per_weight', '?')} images a weight: classifier-FD by weight {scores}; "
                                    f"the rule's {rule})"}
    seen = checkpoint.training(from_dict(cfg), meta)
    why = f"for {seen.images:,} training images" if seen.images else "training unknown"
    if seen.images and seen.knowledge is not None:
        why += f", label knowledge {seen.knowledge:.2f}" + ("" if seen.gain is None else f", label gain {seen.gain:.3f}")
    return {"default_guidance": f"{default_guidance(seen):g} ({why})"}


def _distilled(d: dict | None) -> dict:
    """How a distilled student samples, and from what: nothing for a trained model."""
    if not d:
        return {}
    return {"distilled": f"ddim, {d['steps']} steps, guidance {d['guidance']:g} built in (one pass a step)",
            "teacher": d["teacher"], "teacher_sha256": d["teacher_sha256"], "teacher_steps": d["teacher_steps"]}


def absolute_data_paths(cfg: RunConfig, named: tuple[str, ...]) -> None:
    """Write data paths as absolute paths, so `--resume` and `--config` work from any
    folder (a relative folder name would be looked up where the command runs)."""
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.data.name not in named:
        cfg.data.name = str(Path(cfg.data.name).expanduser().resolve())
