"""Which recipe wins on MNIST (or shapes) at a small budget? Step-matched variants of the defaults,
scored with `diffcli eval` (class accuracy and classifier-FD against the test split).

Each variant trains for the same number of images (`--steps` at batch 32; a variant at
batch 64, the default since 2026-12-06, takes half the steps), so the verdict does not
depend on what else the machine was doing.
Runs already in `--out` are reused, so an interrupted sweep resumes where it stopped.
At the demo's budget the training seed moves shapes' accuracy by up to 30 points
(docs/results.md), so compare variants over several `--seeds`: the table gives the mean
and the range.

    python benchmarks/tune_mnist.py --steps 2400 --data-root data --classifier mnist-classifier.safetensors --variants 'eps;v'
    python benchmarks/tune_mnist.py --data shapes --steps 1000 --classifier runs/shapes-classifier.safetensors \
        --out runs/tune-shapes --variants 'eps;v'
    python benchmarks/tune_mnist.py --data shapes --steps 1100 --classifier runs/shapes-classifier.safetensors \
        --out runs/tune-shapes --variants 'v;v, batch 64' --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from diffcli.config import TrainConfig

# name: `diffcli train` options on top of the defaults. Every variant names its prediction
# target, since the sweep itself moved the default from ε to v.
VARIANTS = {
    "eps": ["--prediction", "eps"],
    "eps, lr 1e-3": ["--prediction", "eps", "--lr", "1e-3"],
    "v": ["--prediction", "v"],
    "eps, EMA 0.9995": ["--prediction", "eps", "--ema-decay", "0.9995"],
    "v, lr 1e-3": ["--prediction", "v", "--lr", "1e-3"],
    "eps, plain MSE (no Min-SNR)": ["--prediction", "eps", "--min-snr-gamma", "0"],
    "eps, batch 64": ["--prediction", "eps", "--batch-size", "64"],
    "v, plain MSE (no Min-SNR)": ["--prediction", "v", "--min-snr-gamma", "0"],
    "v, EMA 0.9995": ["--prediction", "v", "--ema-decay", "0.9995"],
    "v, bf16": ["--prediction", "v", "--precision", "bf16"],
    "v, batch 64": ["--prediction", "v", "--batch-size", "64"],
    "v, batch 64, lr 3e-3": ["--prediction", "v", "--batch-size", "64", "--lr", "3e-3"],
    "v, batch 128": ["--prediction", "v", "--batch-size", "128"],
}
GUIDANCE = {"eps": [1.0, 2.0, 3.0, 5.0], "v": [1.0, 1.5, 2.0, 2.5, 3.0]}  # weights scored for a variant (else the default only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps at batch 32")
    p.add_argument("--data", default="mnist", help="mnist or shapes (any name `diffcli train --data` takes)")
    p.add_argument("--data-root", type=Path, help="where the dataset lives (not needed for shapes)")
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--n", type=int, default=50, help="images per class for the scores")
    p.add_argument("--variants", default=";".join(VARIANTS), help="names separated by ';' (names hold commas)")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated: each variant is trained once per seed")
    p.add_argument("--out", type=Path, default=Path("runs/tune"))
    args = p.parse_args()

    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []  # (variant, guidance, [report per seed])
    for name in args.variants.split(";"):
        flags = VARIANTS[name]
        batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else TrainConfig().batch_size
        steps = args.steps * 32 // batch
        reports: dict[float | None, list] = {w: [] for w in GUIDANCE.get(name, [None])}
        for seed in seeds:
            run = args.out / ("".join(ch if ch.isalnum() else "-" for ch in name) + (f"-seed{seed}" if seed else ""))
            if not (run / "model.safetensors").exists() or _step(run) < steps:
                subprocess.run([sys.executable, "-m", "diffcli", "train", "--data", args.data,
                                *(["--data-root", str(args.data_root)] if args.data_root else []),
                                "--max-steps", str(steps), "--sample-every", str(steps), "--out", str(run), "--overwrite",
                                "--seed", str(seed), *flags], check=True, stdout=subprocess.DEVNULL)
            for w in reports:
                cmd = [sys.executable, "-m", "diffcli", "eval", "--ckpt", str(run / "model.safetensors"), "--classifier",
                       str(args.classifier), "--n", str(args.n), "--no-memorisation", "--json"]
                report = json.loads(subprocess.run(cmd + (["--guidance", str(w)] if w is not None else []), check=True,
                                                   capture_output=True, text=True).stdout)
                reports[w].append(report)
                print(f"{name}, seed {seed}, guidance {report['guidance']:g}: accuracy {report['class_accuracy']:.1%}, "
                      f"classifier-FD {report['classifier_fd']:.3f}", flush=True)
        rows += [(name, runs[0]["guidance"], runs) for runs in reports.values()]

    print(f"\n| variant ({args.steps} steps x 32 images, seeds {args.seeds}) | guidance | class accuracy | classifier-FD |")
    print("|---|---|---|---|")
    for name, w, runs in rows:
        acc, fd = [r["class_accuracy"] for r in runs], [r["classifier_fd"] for r in runs]
        print(f"| {name} | {w:g} | {_spread(acc, '.1%')} | {_spread(fd, '.3f')} |")
    print(f"| real training images | - | - | {rows[0][2][0]['classifier_fd_real_floor']:.3f} |")


def _spread(values: list[float], fmt: str) -> str:
    """The mean, and with several seeds the range: '84.1% (76.8%-92.2%)'."""
    mean = format(sum(values) / len(values), fmt)
    return mean if len(values) == 1 else f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _step(run: Path) -> int:
    from diffcli.checkpoint import model_metadata, read_header

    return model_metadata(read_header(run / "model.safetensors"))["step"]


if __name__ == "__main__":
    main()
