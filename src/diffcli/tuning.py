"""`diffcli tune-guidance`: a model's guidance weight chosen from its own pictures, for where
the rule that guesses it from the training (spec.default_guidance) is off.

The rule reads how long a model trained and how well it knows its labels. On a few classes
that look alike it can miss far: Fashion-MNIST's T-shirts against shirts get 2.7, where 1
draws a tenth of the classifier-FD (docs/results.md, "A second reading"), and five readings of
the model alone have not told such sets apart. A classifier of the user's data can: `tune`
draws the same seeds at each weight and scores them as `diffcli eval` does, and `store` writes
the weight of the lowest classifier-FD into the model file's metadata, where the rule defers to
it (spec.Trained.tuned). The weights' bytes stay as they were. A run's next checkpoint writes
new weights without it: the choice belongs to the weights it was measured on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from diffcli.errors import UserError, listed, writing

if TYPE_CHECKING:  # (evaluation imports torch, and the command line reads WEIGHTS and SEED without it)
    from diffcli.evaluation import EvalOptions

log = logging.getLogger("diffcli")

# Tried when no weights are given, with the rule's own: the rule's span (1.25 to 3) widened to
# the plain conditional model, 1, and to 3.5, where CIFAR-10's four vehicles drew best after
# 10 CPU-minutes (docs/results.md, "Fashion-MNIST").
WEIGHTS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
# The sweep's first image seed, far from eval's 0: an eval after tuning scores pictures the
# choice never saw, so its figure is not flattered by the pick.
SEED = 1_000_000
# Classifier-FD has one valley in the weight (diversity lost on one side, classes on the other),
# so the sweep stops after this many weights in a row worse than the best so far; two, so that
# one noisy point does not end it.
PAST_BEST = 2
# Where the best is still the highest weight measured, a sweep of the default weights goes on past
# it in their step, up to this: `edit`'s weight for a change of class (spec.EDIT_GUIDANCE), about
# Stable Diffusion's 7.5. A list the user gives is measured as given.
HIGHEST = 8.0
STEP = 0.5  # WEIGHTS' own


def sweep(measure: Callable[[float], dict], weights: Sequence[float], always: Sequence[float] = (),
          beyond: bool = False) -> list[dict]:
    """Rows {"guidance": w, **measure(w)} (measure gives at least "classifier_fd") for `weights`
    in rising order, stopping after PAST_BEST in a row worse than the best, and (`beyond`) going
    on past the highest weight in STEPs, up to HIGHEST, while the best is there; each weight of
    `always` is measured whatever the stop, so that the table shows what tuning gains."""
    rows: list[dict] = []
    worse = 0

    def measured(w: float) -> None:
        nonlocal worse
        rows.append({"guidance": w, **measure(w)})
        worse = 0 if best(rows) is rows[-1] else worse + 1

    for w in sorted(set(weights) | set(always)):
        if worse < PAST_BEST or w in always:
            measured(w)
    w = rows[-1]["guidance"]
    if beyond and rows[-1] is best(rows):  # still falling at the top (the rows rise): the valley lies beyond
        while worse < PAST_BEST and w + STEP <= HIGHEST:
            w += STEP
            measured(w)
    return rows


def best(rows: list[dict]) -> dict:
    """The row of the lowest classifier-FD; a NaN one (a model that drew NaN pictures) never wins."""
    return min(rows, key=lambda r: r["classifier_fd"] if math.isfinite(r["classifier_fd"]) else math.inf)


@dataclass(frozen=True)
class TuneOptions:
    eval: EvalOptions  # the model, the classifier, the sampler the weight is chosen for, the images a weight
    weights: tuple[float, ...] | None = None  # None: WEIGHTS, and on past them while the best is the highest
    store: bool = True  # write the chosen weight into the model file


def tune(opts: TuneOptions, device, status=lambda text: contextlib.nullcontext()) -> dict:
    """Score each weight with the classifier, then (opts.store) keep the best in the model
    file. Returns the report: the rows of `sweep`, the rule's weight, the one chosen."""
    from diffcli.checkpoint import model_header, model_metadata
    from diffcli.evaluation import evaluate, prepare
    from diffcli.spec import default_guidance

    path = opts.eval.ckpt
    meta = model_metadata(model_header(path))
    if not meta["class_names"]:
        raise UserError("this model was trained without classes, so it has no guidance weight to tune.")
    if meta["config"].get("distill"):
        raise UserError("this is a distilled student, with its teacher's guidance built in; tune the teacher, "
                        "then distil it again.")
    digest = storable(path) if opts.store else None  # before minutes of sampling
    ev = dataclasses.replace(opts.eval, memorisation=False, fid=False, pairs=None)
    got = prepare(ev, device, status)
    _check_judge(got, opts.store)
    trained = got.model.trained
    rule = default_guidance(trained._replace(tuned=None))
    spec = ev.spec.resolve(got.cfg.diffusion.timesteps, None, trained)

    def measure(w: float) -> dict:
        at_w = dataclasses.replace(ev, spec=dataclasses.replace(ev.spec, guidance=w))
        report, _, _ = evaluate(got.model, got.cfg, got.meta["class_names"], at_w, got.real, got.clf,
                                status=lambda text: status(f"guidance {w:g}: {text}"))
        return {k: report[k] for k in ("class_accuracy", "classifier_fd", "classifier_fd_real_floor", "sampling_s")}

    tried = [w + 0.0 for w in opts.weights or WEIGHTS]  # (+ 0.0: a -0 given is 0)
    rows = sweep(measure, tried, always=[rule] + ([trained.tuned] if trained.tuned is not None else []),
                 beyond=opts.weights is None)
    chosen = best(rows)
    if not math.isfinite(chosen["classifier_fd"]):
        raise UserError("the model drew pictures the classifier could not score (NaN) at every weight; nothing was stored.")
    images = len(got.meta["class_names"]) * ev.n_per_class
    entry = {"weight": chosen["guidance"], "rule": rule, "sampler": spec.sampler, "steps": spec.steps,
             "images_per_weight": images, "seed": ev.seed, "classifier": Path(ev.classifier).name,
             "classifier_fd": {f"{r['guidance']:g}": _rounded(r["classifier_fd"]) for r in rows},
             "real_floor": _rounded(rows[0]["classifier_fd_real_floor"]), "date": time.strftime("%Y-%m-%d")}
    if digest is not None:
        store(path, digest, entry)
    return {"model": str(path), "sampler": spec.sampler, "steps": spec.steps, "images_per_weight": images,
            "seed": ev.seed, "rule": rule, "previous": trained.tuned, "rows": rows, "chosen": chosen["guidance"],
            "stored": digest is not None, "classifier": {"path": str(ev.classifier), "test_accuracy": got.clf_meta["test_accuracy"],
                           "epochs": got.clf_meta["epochs"]}}


def _rounded(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None  # JSON has no NaN (an export's reader would refuse it)


def _check_judge(got, storing: bool) -> None:
    """Refuse a model whose weights hold NaN (every weight would draw the same black pictures),
    and, for a weight to be stored, a classifier or real images of other classes than the model's;
    warn of a classifier trained short."""
    import torch

    from diffcli.classifier import trained_short

    if not all(bool(torch.isfinite(p).all()) for p in got.model.parameters()):
        raise UserError("this model's weights hold NaN or infinite numbers, so every weight draws the same broken "
                        "pictures; resume its run from an earlier checkpoint, or train it again.")
    names = got.meta["class_names"]
    for what, theirs in (("the classifier", got.clf_meta["class_names"]), ("--data", got.real.train.class_names)):
        if storing and theirs != names:
            raise UserError(f"{what} has the classes {listed(theirs, 5)}, the model {listed(names, 5)}: a weight chosen "
                            "on other classes' pictures would not be this model's; use its own, or --no-store to only measure.")
    if usual := trained_short(got.clf_meta):  # docs/results.md, "How much the weight depends on the judge"
        log.warning("the classifier trained for %g epoch(s), fewer than the %d `diffcli classifier train` gives it by default, so "
                    "it may choose a weight far from a fully trained judge's (on CIFAR-10's vehicles one epoch chose 1.5 where the "
                    "full judge chose 3.5); train it again without --epochs.", got.clf_meta["epochs"], usual)


def storable(path: Path) -> str:
    """The model file's SHA-256, once it is clear that a weight could be stored in it: not in a
    run still being written (its next checkpoint would drop it), and writable."""
    from diffcli import runlock
    from diffcli.files import sha256

    real = path.resolve()  # a link: the file it names is the one tuned
    if holder := runlock.busy(real.parent):
        raise UserError(f"'{path}' is in a run folder still being written ({runlock.holder_text(holder)}), whose next "
                        "checkpoint may replace it; tune it when that ends, or pass --no-store to only measure.")
    if _read_only(real) or _read_only(real.parent):
        raise UserError(f"'{path}' is read-only (the file or its folder); make it writable, or pass --no-store to only measure.")
    return sha256(real)


def _read_only(path: Path) -> bool:
    """No write permission for us, or no write bit for anyone: root may write anything, but a
    file its owner made read-only says not to change it."""
    return not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222


def store(path: Path, digest: str, entry: dict) -> None:
    """Write `entry` into the model file's metadata, every weight's bytes unchanged, all or
    nothing; refused when the file is no longer the one measured (`digest`). Under its run's
    lock, where it has one, so that no run writes the file meanwhile."""
    from diffcli import runlock
    from diffcli.checkpoint import tensors_sha256, trained_sha256, tuned_entry, with_metadata
    from diffcli.files import atomic_write_bytes

    real = path.resolve()
    lock = (runlock.holding(real.parent, "diffcli tune-guidance", advice="nothing was stored; tune it when that run ends")
            if (real.parent / runlock.LOCK_FILE).exists() else contextlib.nullcontext())
    with lock:
        data = real.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise UserError(f"'{path}' changed while it was measured (a new checkpoint?), so nothing was stored; tune it again.")
        # the file as trained, and its tensors, which this leaves alone: a distillation still knows its teacher
        entry = {**entry, "untuned_sha256": trained_sha256(data), "tensors_sha256": tensors_sha256(data)}
        with writing(path):  # a full disk: one sentence, and the old file as it was
            atomic_write_bytes(real, with_metadata(data, tuned_entry(entry)))
