"""Line plots (schedules, training curves) with matplotlib, an optional extra.

`pip install 'diffcli[plots]'` brings matplotlib; without it these functions raise a
UserError that says so, and training skips its loss curve without a word (fitting.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffcli.checks import is_number
from diffcli.errors import UserError

MISSING = "plots need matplotlib, an optional extra: pip install 'diffcli[plots]' (or pip install matplotlib)."


def plotting() -> bool:
    """Whether matplotlib can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # in sys.modules as None (a test's way of removing it)
        return False


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(MISSING) from None
    return plt


def schedule_plot(schedules, path: Path, dpi: int = 100) -> Path:
    """ᾱ_t and log-SNR = log(ᾱ_t / (1 - ᾱ_t)) against t, one line per schedule."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=dpi)
    for s in schedules:
        abar = s.alphas_cumprod.double()
        t = range(s.T)
        left.plot(t, abar.tolist(), label=f"{s.name}")
        right.plot(t, (abar / (1 - abar)).log().tolist(), label=f"{s.name}")
    left.set(xlabel="t", ylabel="alpha_bar_t (signal variance kept)", title=f"alpha_bar_t, T={schedules[0].T}")
    right.set(xlabel="t", ylabel="log SNR_t", title="log-SNR = log(alpha_bar / (1 - alpha_bar))")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


LOSS_FIELDS = ("loss", "lr", "images_per_s", "elapsed_s")  # a loss line's numbers (fitting.Meter)


def read_metrics(path: Path, checked: bool = True) -> list[dict]:
    """The lines of a run's metrics.jsonl as dicts, skipping what is not JSON (a line a kill
    cut short, damaged bytes). `checked`: only the lines every reader can use, a loss line
    (fitting.Meter) or a label reading with its numbers, so an edited or damaged line
    cannot stop `inspect` or a resume."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the rest are still good
        if isinstance(record, dict) and (not checked or _usable(record)):
            records.append(record)
    return records


def _usable(record: dict) -> bool:
    if not is_number(record.get("step"), int):
        return False
    if "loss" in record:
        return all(is_number(record.get(k)) for k in LOSS_FIELDS)
    gain = record.get("label_gain")
    return is_number(record.get("label_knowledge")) and (gain is None or is_number(gain))  # (NaN is a number: a diverged loss)


def loss_curve(metrics_path: Path, path: Path, dpi: int = 100) -> Path | None:
    """Loss per metrics line (faint), its exponential moving average (bold), and the
    learning rate on a second axis, against the optimizer step."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]  # not the label readings' lines
    if not records:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    smooth, avg = [], 0.0
    for i, v in enumerate(loss):  # debiased EMA (as TensorBoard smooths), ~5 lines of memory
        avg = 0.6 * avg + 0.4 * v
        smooth.append(avg / (1 - 0.6 ** (i + 1)))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=dpi)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(steps, smooth, color="tab:blue", label="loss (smoothed)")
    if len(set(loss)) > 1 and all(v > 0 and math.isfinite(v) for v in loss):  # (one value: a log axis has no span, a warning)
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
