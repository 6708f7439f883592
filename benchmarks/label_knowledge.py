"""How well a trained model knows its classes, read from the model alone: the diffusion
model as a classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", eq. 3 with one timestep): noise a real test image to t, run the network once
per label, and pick the label whose prediction misses its target least. Accuracy near 1
means the label steers the network; near chance, that guidance has to do the steering.

A measure for a guidance rule that reads the model instead of the data (docs/results.md,
"A guidance rule for photos"): not used by any command yet.

    python benchmarks/label_knowledge.py runs/mnist-10/model.safetensors=mnist \\
        runs/cifar-10/model.safetensors=cifar10-jpeg.tar.gz --data-root data
"""

from __future__ import annotations

import argparse

import torch

from diffcli import data as D
from diffcli.checkpoint import load_model
from diffcli.schedules import make_schedule, q_sample, v_target


@torch.no_grad()
def label_accuracy(model, cfg, images: torch.Tensor, labels: torch.Tensor, t: int, draws: int,
                   gen: torch.Generator) -> float:
    """Share of `images` (uint8) whose own label gives the lowest error at timestep t,
    the error summed over `draws` noises."""
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    x0 = images.float() / 127.5 - 1
    steps = torch.full((len(labels),), t)
    err = torch.zeros(len(labels), cfg.model.num_classes)
    for _ in range(draws):
        noise = torch.randn(x0.shape, generator=gen)
        xt = q_sample(schedule, x0, steps, noise)
        target = v_target(schedule, x0, steps, noise) if cfg.diffusion.prediction == "v" else noise
        for k in range(cfg.model.num_classes):
            out = model(xt, steps, torch.full_like(labels, k)).float()
            err[:, k] += (out - target).pow(2).flatten(1).mean(1)
    return (err.argmin(1) == labels).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="MODEL=DATA: a model file and the --data it was trained on")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=200, help="test images")
    p.add_argument("--draws", type=int, default=2, help="noises per image and timestep")
    p.add_argument("--timesteps", default="100,300,500,700")
    args = p.parse_args()
    ts = [int(t) for t in args.timesteps.split(",")]
    print("| model | step | " + " | ".join(f"t = {t}" for t in ts) + " |")
    print("|---|---|" + "---|" * len(ts))
    for item in args.models:
        path, _, name = item.partition("=")
        model, cfg, meta = load_model(path, torch.device("cpu"))
        test = D.test_split(name, args.data_root, cfg.model.image_size)
        if test is None:
            raise SystemExit(f"{name} has no test split")
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(test.labels), generator=gen)[:args.n]
        accs = [label_accuracy(model, cfg, test.images[pick], test.labels[pick], t, args.draws, gen) for t in ts]
        print(f"| {path} | {meta['step']:,} | " + " | ".join(f"{a:.2f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
