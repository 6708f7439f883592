"""Which EMA length samples best? Post-hoc EMA (`diffcli ema`) at several lengths from one
run's snapshots, against the run's own EMA, each scored by `diffcli eval`'s `evaluate` on
the same seeds at the guidance `sample` would use, with a grid of each one's pictures.

    diffcli train --data mnist --data-root data --minutes 10 --ema-snapshot-every 250 --out runs/mnist
    python benchmarks/ema_lengths.py --run runs/mnist --classifier mnist-classifier.safetensors \\
        --lengths 0.03,0.05,0.08,0.12,0.18 --pictures docs/images/ema
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffcli import ema, posthoc
from diffcli.checkpoint import load_model
from diffcli.classifier import load_classifier
from diffcli.devices import describe, pick_device
from diffcli.evaluation import real_images
from diffcli.runs import snapshots
from diffcli.spec import SamplerSpec

from _scored import HEADER, scored_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder with EMA snapshots")
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--lengths", default="0.03,0.05,0.08,0.12,0.18", help="sigma_rel values, comma-separated")
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: sample's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--pictures", type=Path, default=None, help="folder for one grid per EMA")
    args = p.parse_args()

    device = pick_device(args.device)
    _, cfg, meta = load_model(args.run / "model.safetensors")
    own = ema.classic_sigma_rel(meta["step"], cfg.train.ema_decay)
    models = [(f"the run's own ({own:.3f})", args.run / "model.safetensors")]
    lengths = [float(text) for text in args.lengths.split(",")]
    for sigma_rel, (path, error) in zip(lengths, posthoc.write_models(args.run, lengths, [posthoc.made_path(args.run, s) for s in lengths])):
        models.append((f"post-hoc {sigma_rel:g} (fit error {error:.1%})", path))
    clf, _ = load_classifier(args.classifier, device)
    real = real_images(cfg.data.name, args.data_root or cfg.data.root, cfg.model.image_size)
    rows = ["| EMA (length) " + HEADER, "|---|---|---|---|---|"]
    for name, path in models:
        model, cfg, meta = load_model(path, device)
        row, report = scored_row(name, model, cfg, meta["class_names"], path, SamplerSpec(steps=args.steps), args.n,
                                 args.seed, real, clf, args.pictures / f"{path.stem}.png" if args.pictures else None)
        rows.append(row)
        print(row, flush=True)
    print("\n".join(rows))
    print(f"step {meta['step']}, {len(snapshots(args.run))} snapshots; real-image floor "
          f"{report['classifier_fd_real_floor']:.3f}; {args.n} images per class, seeds {args.seed}..; "
          f"guidance {report['guidance']:g}; {describe(device)}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
