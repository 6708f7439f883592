"""Checkpoints as safetensors, never pickle.

- `model.safetensors`: weights (EMA) plus metadata {"format": "diffcli", "config": JSON
  of the run config, "class_names": JSON list, "step", "epoch", "version"}. Enough to sample.
- `train_state.safetensors`: raw and EMA weights, optimizer moments, RNG states; its
  metadata holds the scalars (step, epoch, optimizer hyper-parameters) as JSON.

Every write is atomic (files.py): a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from pathlib import Path

from diffcli.checks import is_number
from diffcli.errors import UserError
from diffcli.files import atomic_write_bytes
from diffcli.spec import LabelReading, Trained

log = logging.getLogger("diffcli")

FORMAT = "diffcli"
SNAPSHOT_FORMAT = "diffcli-ema-snapshot"  # posthoc.py
CLASSIFIER_FORMAT = "diffcli-classifier"  # classifier.py
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
TUNED = "tuned_guidance"  # the metadata entry `diffcli tune-guidance` writes (tuning.py)


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_header(path: str | Path) -> dict:
    """The safetensors JSON header (tensor dtypes, shapes, metadata) without reading the weights."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist.")  # (a model, a classifier, a snapshot: the option names which)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder; pass the .safetensors file inside it (usually {path / 'model.safetensors'}).")
    try:
        with open(path, "rb") as f:
            raw = f.read(9)
            # zip (torch.save) or pickle protocol >= 2; a safetensors header length may start with 0x80 too,
            # but its ninth byte is the header's "{"
            if raw[8:9] != b"{" and (raw[:2] == b"PK" or raw[:1] == b"\x80"):
                raise UserError(f"'{path}' looks like a pickle/PyTorch file; diffcli loads only .safetensors and never unpickles files.")
            if len(raw) < 9 or raw[8:9] != b"{":
                raise ValueError("it does not start with a safetensors header")
            (n,) = struct.unpack("<Q", raw[:8])
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise ValueError("its header runs past the end of the file")
            f.seek(8)
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
        if 8 + n + max(ends, default=0) > path.stat().st_size:  # inspect reads only the header: say it here
            raise ValueError(f"it is cut short ({path.stat().st_size:,} bytes of the {8 + n + max(ends):,} its header describes)")
    except PermissionError:
        raise UserError(f"'{path}' cannot be read (permission denied).") from None
    except (ValueError, UnicodeDecodeError, TypeError, IndexError, KeyError) as e:  # (the last three: odd data_offsets)
        raise UserError(f"'{path}' is not a readable safetensors file: {e}.") from None
    return header


# What each of diffcli's other files is, said where a model was expected.
NOT_A_MODEL = {
    "training state": "is a run's training state (weights, optimizer and random state, for `diffcli train --resume`), "
                      "not a model; use the model.safetensors beside it",
    "EMA snapshot": "is an EMA snapshot of a run, not a model; `diffcli ema --run RUN --length L` makes a model from "
                    "a run's snapshots",
    "classifier": "is a reference classifier (for `diffcli eval --classifier`), not a diffusion model",
}


def file_kind(header: dict) -> str:
    """What a safetensors file is, from its metadata: "model", one of NOT_A_MODEL, or "foreign"."""
    meta = header.get("__metadata__") or {}
    kind = {SNAPSHOT_FORMAT: "EMA snapshot", CLASSIFIER_FORMAT: "classifier"}.get(meta.get("format"))
    if kind is None and meta.get("format") == FORMAT:
        kind = "training state" if "optimizer" in meta else "model"
    return kind or "foreign"


def model_header(path: str | Path) -> dict:
    """The header of a diffcli model file, refused in one sentence when it is another of
    diffcli's files (what it is, and what to use)."""
    header = read_header(path)
    kind = file_kind(header)
    if kind in NOT_A_MODEL:
        raise UserError(f"'{path}' {NOT_A_MODEL[kind]}.")
    return header
def model_metadata(header: dict) -> dict:
    """The diffcli metadata of a model file: config (dict), class_names (list), step, epoch,
    version, label_knowledge and label_gain (floats, or None where not measured), and
    tuned_guidance (`diffcli tune-guidance`'s entry, a dict with a "weight", or None)."""
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError("this safetensors file was not written by diffcli (no diffcli config in its metadata).")
    try:
        return {
            "config": json.loads(meta["config"]),
            "class_names": json.loads(meta.get("class_names", "[]")),
            "step": int(meta.get("step", 0)),
            "epoch": float(meta.get("epoch", 0)),
            "version": meta.get("version", "?"),
            "label_knowledge": float(meta["label_knowledge"]) if "label_knowledge" in meta else None,
            "label_gain": float(meta["label_gain"]) if "label_gain" in meta else None,
            "tuned_guidance": _tuned(meta.get(TUNED)),
        }
    except (ValueError, TypeError):
        raise UserError("the diffcli metadata in this checkpoint is damaged.") from None


def _tuned(text: str | None) -> dict | None:
    """A tuned-guidance entry, or None where there is none; a damaged one is left out with a
    warning, so that the model still samples (with the rule's weight)."""
    if text is None:
        return None
    try:
        if (entry := valid_tuned(json.loads(text))) is not None:
            return entry
    except ValueError:
        pass
    log.warning("this model's tuned guidance weight is damaged; it samples with the rule's weight "
                "(`diffcli tune-guidance` measures it again).")
    return None


def valid_tuned(entry) -> dict | None:
    """A tuned-guidance entry whose weight a sampler can use (a finite number >= 0), else None."""
    weight = entry.get("weight") if isinstance(entry, dict) else None
    return entry if is_number(weight) and math.isfinite(weight) and weight >= 0 else None


def tuned_entry(entry: dict | None) -> dict:
    """The metadata entry of a tuned guidance weight (model_metadata reads it back)."""
    return {} if entry is None else {TUNED: json.dumps(entry)}


def trained_sha256(data: bytes) -> str:
    """The SHA-256 of a model file (its bytes) as its training wrote it: the file's own, or,
    once `tune-guidance` rewrote its header, the one it had before, which the tuned entry
    keeps beside a hash of the tensors it left alone (so that other tensors under a copied
    header do not pass). A distillation names its teacher by it (distill.py)."""
    try:
        tuned = valid_tuned(json.loads((_split(data)[0].get("__metadata__") or {}).get(TUNED) or "null")) or {}  # (no warning: a hash)
        kept = tuned.get("untuned_sha256")
        if isinstance(kept, str) and tuned.get("tensors_sha256") == tensors_sha256(data):
            return kept
    except (struct.error, ValueError, TypeError, AttributeError):  # not a safetensors file (any more): its own hash
        pass
    return hashlib.sha256(data).hexdigest()


def tensors_sha256(data: bytes) -> str:
    """The SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes), not of its metadata."""
    header, tensors = _split(data)
    header.pop("__metadata__", None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(tensors)
    return digest.hexdigest()


def _split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's bytes as its JSON header and the tensors' bytes after it."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_metadata(data: bytes, extra: dict[str, str]) -> bytes:
    """A safetensors file's bytes with `extra` added to its metadata and every tensor's bytes
    as they were: only the header is written anew (its offsets count from the data's start)."""
    header, tensors = _split(data)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), **extra}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # padded to 8 bytes, as safetensors writes it: the tensors stay aligned
    return struct.pack("<Q", len(text)) + text + tensors


def labels_entry(labels: LabelReading | None) -> dict:
    """The metadata entries of a label reading (model_metadata reads them back)."""
    if labels is None:
        return {}
    return {"label_knowledge": f"{labels.knowledge:.4f}", **({} if labels.gain is None else {"label_gain": f"{labels.gain:.5f}"})}


def label_reading(meta: dict) -> LabelReading | None:
    """The label reading in model_metadata's dict; None where it was not measured."""
    return None if meta["label_knowledge"] is None else LabelReading(meta["label_knowledge"], meta["label_gain"])


def training(cfg, meta: dict) -> Trained:
    """What the guidance rule reads of a model's training, from its metadata."""
    tuned = meta.get("tuned_guidance")
    return Trained(cfg.images_seen(meta["step"]), meta["label_knowledge"], meta["label_gain"],
                   None if tuned is None else float(tuned["weight"]))


def save_model(path: Path, state_dict: dict, cfg_dict: dict, class_names: list[str], step: int, epoch: float,
               labels: LabelReading | None = None, tuned: dict | None = None) -> None:
    from diffcli import __version__

    metadata = {
        "format": FORMAT,
        "version": __version__,
        "config": json.dumps(cfg_dict),
        "class_names": json.dumps(class_names),
        "step": str(step),
        "epoch": f"{epoch:.4f}",
    }
    save_tensors(path, state_dict, {**metadata, **labels_entry(labels), **tuned_entry(tuned)})


def load_model(path: str | Path, device="cpu"):
    """Build the U-Net from a model file. Returns (model in eval mode, RunConfig, metadata)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from diffcli.config import from_dict, validate
    from diffcli.unet import UNet

    path = Path(path)
    meta = model_metadata(model_header(path))
    try:  # checked as a config file is: a value no run could have written is damage
        cfg = from_dict(meta["config"])
        validate(cfg)
    except UserError as e:
        raise UserError(f"'{path}' holds a config this diffcli cannot use (damaged, or from another version): {e}") from None
    model = UNet(cfg.model)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"'{path}' could not be read: it looks truncated or damaged ({e}).") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        what = (f"{len(missing)} weight(s) missing" if missing else "") or (f"{len(unexpected)} weight(s) it does not name" if unexpected else "") \
            or f"{len(bad_shape)} weight(s) of the wrong shape (e.g. {bad_shape[0]})"
        raise UserError(f"'{path}' does not match its own config: {what}.")
    model.load_state_dict(tensors)
    model.student = cfg.distill.student() if cfg.distill is not None else None
    model.trained = training(cfg, meta)
    # channels_last, as in training: oneDNN's convolutions run ~25% faster in it on the CPU
    # (benchmarks/sample_throughput.py), and CUDA's tensor cores want it.
    return model.to(device, memory_format=torch.channels_last).eval(), cfg, meta
