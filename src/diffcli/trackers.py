"""Experiment trackers: TensorBoard and Weights & Biases, each an optional extra.

`open_trackers(names, out, ...)` returns a `Trackers` that the loop's `report` events
pass through (`Trackers.wrap`): every metrics line becomes scalars at its step, every
sample grid an image at its step, the resolved config the run's hyperparameters. A
tracker that fails mid-run (a full disk, W&B unreachable) costs one notice and is
dropped; the run goes on. Only rank 0 opens trackers.

- TensorBoard writes into `RUN/tensorboard/`. A resumed run opens it with
  `purge_step` at the checkpoint's step + 1, so the steps logged after that checkpoint by
  the interrupted session are not shown twice.
- W&B keeps its run id in `RUN/wandb_id`, so `--resume` continues the same W&B run; its
  files go where W&B's own settings put them (`WANDB_DIR`, `WANDB_MODE=offline`, ...),
  the project is `--wandb-project` or `WANDB_PROJECT`.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Callable

from diffcli.checks import is_number
from diffcli.errors import UserError

TRACKERS = ("tensorboard", "wandb")
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the pip extra of each
WANDB_ID_FILE = "wandb_id"


def parse(text: str) -> list[str]:
    """'none', 'tensorboard', 'wandb' or 'tensorboard,wandb' -> the tracker names."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if bad := [n for n in names if n not in TRACKERS]:
        raise UserError(f"--log takes none, {', '.join(TRACKERS)} or both joined by a comma; got '{bad[0]}'.")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """One sentence naming the extra of the first tracker that is not installed."""
    import importlib.util

    for name in names:  # each tracker's module has its extra's name
        if importlib.util.find_spec(EXTRA[name]) is None:
            raise UserError(f"--log {name} needs the '{EXTRA[name]}' extra: pip install 'diffcli[{EXTRA[name]}]'.")


class Trackers:
    def __init__(self, writers: dict, notice: Callable[[str], None]):
        self.writers, self.notice = writers, notice

    def _each(self, what: str, call) -> None:
        for name in list(self.writers):
            try:
                call(self.writers[name])
            except Exception as e:  # a tracker must never cost the run
                self.notice(f"{name} stopped logging ({what} failed: {type(e).__name__}: {e}); the run goes on without it.")
                self._close(name)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._each("scalars", lambda w: w.scalars(step, values))

    def image(self, step: int, tag: str, path: Path) -> None:
        self._each("an image", lambda w: w.image(step, tag, path))

    def summary(self, step: int, values: dict[str, float]) -> None:
        self._each("the summary", lambda w: w.summary(step, values))

    def _close(self, name: str) -> None:
        writer = self.writers.pop(name)
        try:
            writer.close()
        except Exception:
            pass

    def close(self) -> None:
        for name in list(self.writers):
            self._close(name)

    def wrap(self, report: Callable[..., None]) -> Callable[..., None]:
        """`report`, with the metrics lines and grids also sent to the trackers."""
        def tracked(event: str, **info) -> None:
            if event in ("log", "labels"):
                self.scalars(info["step"], {k: v for k, v in info.items() if k != "step"})
            elif event == "grid":
                self.image(info["step"], "samples", Path(info["path"]))
            report(event, **info)

        return tracked


@contextlib.contextmanager
def tracking(cfg, out: Path, step: int, resume: bool, world, report: Callable[..., None]):
    """`report`, wrapped by the trackers `cfg.train.log` names on rank 0 (unchanged on the
    others, or with none asked for); they are closed when the block ends, however it ends."""
    names = parse(cfg.train.log)
    if not names or not world.is_main:
        yield report
        return
    from diffcli.config import to_dict

    trackers = open_trackers(names, out, to_dict(cfg), step, resume, cfg.train.wandb_project,
                             lambda message: report("notice", message=message))
    try:
        yield trackers.wrap(report)
    finally:
        trackers.close()


def open_trackers(names: list[str], out: Path, config: dict, step: int, resume: bool, project: str | None,
                  notice: Callable[[str], None]) -> Trackers:
    """The trackers `names` for the run folder `out`, at `step` (0 for a new run)."""
    writers = {}
    for name in names:
        try:
            writers[name] = (TensorBoard if name == "tensorboard" else WandB)(out, config, step, resume, project)
        except Exception as e:
            notice(f"{name} could not start ({type(e).__name__}: {e}); the run goes on without it.")
    return Trackers(writers, notice)


def log_eval(names: list[str], ckpt: Path, report: dict, notice: Callable[[str], None]) -> None:
    """`diffcli eval --log`: the numbers of `report` into the trackers of the run folder
    that holds `ckpt`, at the model's step (the W&B run is the training run's)."""
    from diffcli.checkpoint import model_metadata, read_header

    meta = model_metadata(read_header(ckpt))
    project = meta["config"].get("train", {}).get("wandb_project")
    numbers = {k: v for k, v in report.items() if is_number(v)}
    trackers = open_trackers(names, ckpt.parent, meta["config"], meta["step"], True, project, notice)
    trackers.summary(meta["step"], numbers)
    trackers.close()


class TensorBoard:
    def __init__(self, out: Path, config: dict, step: int, resume: bool, project: str | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it, left by the session that was interrupted, are hidden
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if resume else None)
        if not resume:
            self.writer.add_text("config", "\n".join(f"    {line}" for line in _yaml(config).splitlines()), 0)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def summary(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, config: dict, step: int, resume: bool, project: str | None):
        import wandb

        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]  # W&B's own id format
        self.run = wandb.init(project=project, id=run_id, resume="allow", config=config, name=out.name)
        if not id_file.exists():
            id_file.write_text(run_id + "\n")

    def scalars(self, step: int, values: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(path))}, step=step)

    def summary(self, step: int, values: dict) -> None:
        self.run.summary.update({f"eval/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.run.finish()


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
