"""What `diffcli inspect` prints of a checkpoint file or a run folder, from file headers and
the run's metrics alone (no network is built, no tensor read)."""

from __future__ import annotations

import json
from pathlib import Path
from shlex import quote

from diffcli import checkpoint
from diffcli.checks import is_number
from diffcli.config import from_dict
from diffcli.errors import UserError
from diffcli.files import MODEL_FILE
from diffcli.runs import METRICS_FILE, snapshots
from diffcli.spec import default_guidance


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
