"""Guidance rules side by side on one model: class accuracy and classifier-FD of classifier-free
guidance at several weights, limited to a noise interval (Kynkäänniemi et al. 2024), and
against a weaker model (autoguidance, Karras et al. 2024), each scored by `diffcli eval`'s
own `evaluate` on the same seeds, with a grid of each rule's pictures (the same seeds too).

    python benchmarks/guidance_rules.py --ckpt runs/mnist/model.safetensors \\
        --classifier mnist-classifier.safetensors --weak runs/mnist-1000/model.safetensors \\
        --rules 'auto;2;1.5;1.5@0.28,5.42;auto 2' --pictures docs/images/guidance

A rule is `W` (classifier-free at weight W), `W@LOW,HIGH` (only where LOW < sigma <= HIGH),
`auto W` (autoguidance against --weak at weight W) or `auto` (the default weight of
`diffcli sample` for this model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffcli.checkpoint import load_model
from diffcli.classifier import load_classifier
from diffcli.devices import describe, pick_device
from diffcli.evaluation import real_images
from diffcli.guidance import guided
from diffcli.spec import SamplerSpec, interval_text

from _scored import HEADER, scored_row


class Autoguided(torch.nn.Module):
    """`strong` guided away from `weak` (guidance.guided's `weak`) as one network, which
    `evaluate` then samples at guidance 1, so the rule itself is written only once."""

    def __init__(self, strong, weak, weight: float):
        super().__init__()
        self.strong, self.weak = strong, weak
        self.cfg, self.student, self.trained = strong.cfg, None, strong.trained
        self.mix = guided(strong, weight, strong.cfg.num_classes, weak=weak)

    def forward(self, x, t, y):
        return self.mix(x, t, y)


def parse_rule(text: str) -> tuple[str, float | None, tuple[float, float] | None]:
    """'1.5@0.28,5.42' -> ('cfg', 1.5, (0.28, 5.42)); 'auto 2' -> ('autoguidance', 2.0, None);
    'auto' -> ('cfg', None, None): the model's default weight."""
    text = text.strip()
    if text == "auto":
        return "cfg", None, None
    if text.startswith("auto "):
        return "autoguidance", float(text.split()[1]), None
    weight, _, interval = text.partition("@")
    return "cfg", float(weight), tuple(map(float, interval.split(","))) if interval else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--weak", type=Path, default=None, help="the weaker model for 'auto W' rules")
    p.add_argument("--rules", default="auto;1;1.5;2;2@0.28,5.42")
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: sample's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--pictures", type=Path, default=None, help="folder for one grid per rule")
    args = p.parse_args()

    device = pick_device(args.device)
    model, cfg, meta = load_model(args.ckpt, device)
    weak = load_model(args.weak, device)[0] if args.weak else None
    clf, _ = load_classifier(args.classifier, device)
    real = real_images(cfg.data.name, args.data_root or cfg.data.root, cfg.model.image_size)
    rows = ["| rule | guidance " + HEADER, "|---|---|---|---|---|---|"]
    for text in args.rules.split(";"):
        kind, weight, interval = parse_rule(text)
        if kind == "autoguidance":
            if weak is None:
                raise SystemExit(f"rule '{text}' needs --weak")
            net, spec = Autoguided(model, weak, weight), SamplerSpec(steps=args.steps, guidance=1.0)
        else:
            net, spec = model, SamplerSpec(steps=args.steps, guidance=weight, interval=interval)
        resolved = spec.resolve(cfg.diffusion.timesteps, model.student, model.trained)
        shown = weight if kind == "autoguidance" else resolved.guidance
        name = f"{kind}{interval_text(interval)}" + (f" against {args.weak.parent.name}" if kind == "autoguidance" else "")
        slug = text.replace(" ", "_").replace("@", "_at_").replace(",", "-")
        row, report = scored_row(f"{name} | {shown:g}", net, cfg, meta["class_names"], args.ckpt, spec, args.n, args.seed,
                                 real, clf, args.pictures / f"{slug}.png" if args.pictures else None)
        rows.append(row)
        print(rows[-1], flush=True)
    print("\n".join(rows))
    print(f"real-image floor {report['classifier_fd_real_floor']:.3f}; {args.n} images per class, seeds {args.seed}..; "
          f"DDIM {resolved.steps}; {describe(device)}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
