"""Post-hoc EMA on disk: the snapshots a run saves of its power-function EMAs, and the
model file `diffcli ema` makes from them for any EMA length (the maths is in ema.py).

    runs/NAME/ema_snapshots/step_0000500.safetensors   the parameters of each profile in
                                                       ema.PROFILES after step 500

A snapshot holds len(PROFILES) copies of the parameters in float32: 8 bytes per parameter
(5.7 MB for the `small` U-Net), every `train.ema_snapshot_every` steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from diffcli import checkpoint, ema
from diffcli.errors import UserError
from diffcli.runs import MODEL_FILE, SNAPSHOT_DIR

SNAPSHOT_FORMAT = "diffcli-ema-snapshot"
_NAME = re.compile(r"step_(\d+)\.safetensors")


def save_snapshot(out: Path, step: int, profiles: list[torch.nn.Module]) -> Path:
    tensors = {f"{i}.{name}": p for i, profile in enumerate(profiles) for name, p in profile.named_parameters()}
    path = out / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"
    path.parent.mkdir(exist_ok=True)
    checkpoint.save_tensors(path, tensors, {"format": SNAPSHOT_FORMAT, "step": str(step),
                                            "sigma_rels": json.dumps(list(ema.PROFILES))})
    return path


def snapshots(out: Path) -> dict[int, Path]:
    """The run's snapshots by step."""
    folder = out / SNAPSHOT_DIR
    found = (_NAME.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return dict(sorted((int(m.group(1)), folder / m.group(0)) for m in found if m))


def truncate(out: Path, step: int) -> None:
    """Drop snapshots after `step`: on resume, those a crashed session wrote past its last
    checkpoint; on a fresh start (step 0), another run's."""
    for k, path in snapshots(out).items():
        if k > step:
            path.unlink()


def reconstruct(run: Path, target: Callable[[int], torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict, float]:
    """The weights of the EMA whose β_1..β_T is `target(T)`, at the run's last snapshot
    T, as the combination of all its snapshots that `ema.solve` finds, over the buffers
    of the run's model file. Returns (state dict, model metadata, relative error)."""
    from safetensors.torch import load_file

    found = snapshots(run)
    if not found:
        raise UserError(f"'{run}' has no EMA snapshots ({SNAPSHOT_DIR}/): train with --ema-snapshot-every N "
                        f"(on by default) to make them.")
    meta = checkpoint.model_metadata(checkpoint.read_header(run / MODEL_FILE))
    last = max(found)
    sigma_rels = json.loads(checkpoint.read_header(found[last])["__metadata__"]["sigma_rels"])
    betas = [ema.power_betas(last, s) for s in sigma_rels]
    x, error = ema.solve([(k, b) for k in found for b in betas], target(last))
    weights = dict(zip([(k, i) for k in found for i in range(len(betas))], x.tolist()))
    total: dict[str, torch.Tensor] = {}
    for k, path in found.items():
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise UserError(f"EMA snapshot '{path}' is damaged ({e}); delete it and run again.") from None
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            total[name] = total.get(name, 0) + weights[(k, int(i))] * value.double()
    state = load_file(str(run / MODEL_FILE))
    missing = set(total) - set(state)
    if missing:
        raise UserError(f"the EMA snapshots in '{run}' do not match its model file ({len(missing)} unknown weights).")
    state.update({name: value.to(state[name].dtype) for name, value in total.items()})
    return state, {**meta, "step": last}, error


def write_model(run: Path, sigma_rel: float, path: Path) -> float:
    """`reconstruct` saved as a normal model file at `path`; returns the fit's relative error."""
    state, meta, error = reconstruct(run, lambda steps: ema.power_betas(steps, sigma_rel))
    checkpoint.save_model(path, state, meta["config"], meta["class_names"], meta["step"], meta["epoch"])
    return error
