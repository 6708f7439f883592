"""How well trained models know their classes, at several noise levels: the label knowledge
that `diffcli train` measures at one level for the guidance rule (knowledge.py; 0 chance, 1
always right), here on the test split and at any timesteps, to see where it separates
datasets (docs/results.md, "What the model knows of its labels"), and the label's gain
(knowledge.label_gain, the guidance rule's second reading) at training's noise level on the
same images (docs/results.md, "A second reading").

    python benchmarks/label_knowledge.py runs/mnist-10/model.safetensors=mnist \\
        runs/cifar-10/model.safetensors=cifar10-jpeg.tar.gz --data-root data
"""

from __future__ import annotations

import argparse

import torch

from diffcli import data as D
from diffcli.checkpoint import load_model
from diffcli.knowledge import WAYS, label_gain, label_knowledge
from diffcli.objective import of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="MODEL=DATA: a model file and the --data it was trained on")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=200, help="test images")
    p.add_argument("--draws", type=int, default=2, help="noises per image and timestep")
    p.add_argument("--timesteps", default="300,500,700,850")
    p.add_argument("--ways", type=int, default=WAYS, help="labels tried per image (its own and up to WAYS-1 others); "
                   "the same for every set compares sets of different class counts")
    args = p.parse_args()
    ts = [int(t) for t in args.timesteps.split(",")]
    print("| model | step | stored | " + " | ".join(f"t = {t}" for t in ts) + " | gain |")
    print("|---|---|---|" + "---|" * (len(ts) + 1))
    for item in args.models:
        path, _, name = item.partition("=")
        model, cfg, meta = load_model(path, torch.device("cpu"))
        test = D.test_split(name, args.data_root, cfg.model.image_size)
        if test is None:
            raise SystemExit(f"{name} has no test split")
        objective = of(cfg.diffusion)
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(test.labels), generator=gen)[:args.n]
        x0 = D.to_model_range(test.images[pick])
        known = [label_knowledge(model, objective, x0, test.labels[pick], cfg.model.num_classes,
                                 gen, args.draws, t, args.ways) for t in ts]
        gain = label_gain(model, objective, x0, test.labels[pick], cfg.model.num_classes, gen, args.draws)
        stored = "-" if meta["label_knowledge"] is None else f"{meta['label_knowledge']:.2f}"
        print(f"| {path} | {meta['step']:,} | {stored} | " + " | ".join(f"{k:.2f}" for k in known) + f" | {gain:.4f} |", flush=True)


if __name__ == "__main__":
    main()
