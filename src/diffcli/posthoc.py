"""Post-hoc EMA on disk: the snapshots a run saves of its power-function EMAs, and the
model files `diffcli ema` makes from them for any EMA length (the maths is in ema.py).

    runs/NAME/ema_snapshots/step_0000500.safetensors   the parameters of each profile in
                                                       ema.PROFILES after step 500

A snapshot holds len(PROFILES) copies of the parameters in float32: 8 bytes per parameter
(5.7 MB for the `small` U-Net), every `train.ema_snapshot_every` steps and at every
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from diffcli import checkpoint, ema
from diffcli.errors import UserError, writing
from diffcli.runs import MODEL_FILE, SNAPSHOT_DIR, snapshots

MADE_PREFIX = "ema-"  # the model files `diffcli ema` writes into a run folder: ema-0.1.safetensors


def save_snapshot(out: Path, step: int, profiles: list[torch.nn.Module]) -> Path:
    tensors = {f"{i}.{name}": p for i, profile in enumerate(profiles) for name, p in profile.named_parameters()}
    path = out / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"
    checkpoint.save_tensors(path, tensors, {"format": checkpoint.SNAPSHOT_FORMAT, "step": str(step),
                                            "sigma_rels": json.dumps(list(ema.PROFILES))})
    return path


def truncate(out: Path, step: int) -> None:
    """Drop snapshots after `step`: on resume, those a crashed session wrote past its last
    checkpoint; on a fresh start (step 0), another run's, and the models made from them."""
    for k, path in snapshots(out).items():
        if k > step:
            path.unlink()
    if step == 0:
        for path in out.glob(f"{MADE_PREFIX}*.safetensors"):
            path.unlink()


def made_path(run: Path, sigma_rel: float) -> Path:
    return run / f"{MADE_PREFIX}{sigma_rel:g}.safetensors"


def used(run: Path, step: int) -> dict[int, Path]:
    """The run's snapshots that a model of `step` is made from: those up to it."""
    return {k: path for k, path in snapshots(run).items() if k <= step}


def reconstruct(run: Path, targets: list[Callable[[int], torch.Tensor]]) -> tuple[list[tuple[dict, float]], dict]:
    """For each target (T -> the β_1..β_T of an EMA), that EMA's weights at the model's
    step T, as the combination of the snapshots up to T that `ema.solve` finds, over the
    buffers of the run's model file; and the fit's relative error. Each snapshot is read
    once. Returns ([(state dict, error) per target], the model file's metadata)."""
    model_path = run / MODEL_FILE
    model, _, meta = checkpoint.load_model(model_path)  # refuses a model file that does not match its config
    found = used(run, meta["step"])
    if not found:
        raise UserError(f"'{run}' holds no EMA snapshots ({SNAPSHOT_DIR}/) up to its model's step {meta['step']}: "
                        f"train with --ema-snapshot-every N to make them.")
    last = max(found)
    sigma_rels = _sigma_rels(found[last])
    profiles = [ema.power_betas(last, s) for s in sigma_rels]
    solved = [ema.solve(list(found), profiles, target(last)) for target in targets]
    state = {name: value.contiguous() for name, value in model.state_dict().items()}
    params = [name for name, _ in model.named_parameters()]  # the buffers are not averaged
    expected = {f"{p}.{name}": state[name].shape for p in range(len(sigma_rels)) for name in params}
    totals = [{} for _ in targets]
    for i, path in enumerate(found.values()):
        tensors = _load(path)
        if {key: value.shape for key, value in tensors.items()} != expected:
            raise UserError(f"EMA snapshot '{path}' does not match the model file '{model_path}' (another run's?).")
        for (x, _), total in zip(solved, totals):
            for key, value in tensors.items():
                p, name = key.split(".", 1)
                total[name] = total.get(name, 0) + x[i, int(p)].item() * value.double()
    if last < meta["step"]:  # the last snapshot's write failed: the model is of that step
        meta = {**meta, "epoch": meta["epoch"] * last / meta["step"], "step": last}
    return [({**state, **{k: v.to(state[k].dtype) for k, v in total.items()}}, error)
            for total, (_, error) in zip(totals, solved)], meta


def write_models(run: Path, sigma_rels: list[float], paths: list[Path]) -> list[tuple[Path, float]]:
    """`reconstruct` the power-function EMAs of these lengths and save each as a normal
    model file at its path (checked by the caller: outputs.check); [(path, fit error)]."""
    targets = [lambda steps, s=s: ema.power_betas(steps, s) for s in sigma_rels]
    made, meta = reconstruct(run, targets)
    for path, (state, _) in zip(paths, made):
        with writing(path):
            checkpoint.save_model(path, state, meta["config"], meta["class_names"], meta["step"], meta["epoch"],
                                  checkpoint.label_reading(meta))  # the run's own EMA's: close, and far nearer than none
    return [(path, error) for path, (_, error) in zip(paths, made)]


def _sigma_rels(path: Path) -> list[float]:
    meta = checkpoint.read_header(path).get("__metadata__") or {}
    try:
        sigma_rels = [float(s) for s in json.loads(meta["sigma_rels"])] if meta.get("format") == checkpoint.SNAPSHOT_FORMAT else []
    except (KeyError, TypeError, ValueError):
        sigma_rels = []
    if not sigma_rels or not all(0 < s < 0.29 for s in sigma_rels):
        raise UserError(f"'{path}' is not a diffcli EMA snapshot, or its metadata is damaged.")
    return sigma_rels


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error, a truncated file, permissions
        raise UserError(f"the EMA snapshot '{path}' could not be read: it looks damaged ({e}).") from None
