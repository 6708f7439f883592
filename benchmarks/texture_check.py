"""Is the reference classifier judging shape or texture? Scores real test images with and
without mild Gaussian noise, and two models' samples raw and after a 3x3 binomial blur.

A classifier that drops far on noisy real images penalises grainy samples for their grain,
so its class accuracy and classifier-FD cannot settle ε against v by themselves.

    python benchmarks/texture_check.py --data shapes --classifier runs/shapes-classifier.safetensors \\
        --models runs/tune-shapes/eps/model.safetensors,runs/tune-shapes/v/model.safetensors --guidance 3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffcli import data as D
from diffcli.checkpoint import load_model
from diffcli.classifier import load_classifier, predict
from diffcli.generate import generate
from diffcli.objective import of
from diffcli.spec import SamplerSpec


def blur(imgs: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    c = imgs.shape[1]
    x = F.conv2d(F.pad(imgs.float(), (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)


def noisy(imgs: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (imgs.float() + sigma * torch.randn(imgs.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="shapes")
    p.add_argument("--data-root", default=None)
    p.add_argument("--classifier", required=True)
    p.add_argument("--models", required=True, help="model.safetensors files, comma-separated")
    p.add_argument("--n", type=int, default=500, help="images scored per set")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sigma", type=float, default=12.0, help="noise on real images, in 0..255 pixel units")
    args = p.parse_args()
    clf, _ = load_classifier(args.classifier)

    def accuracy(imgs, labels) -> float:
        return (predict(clf, imgs)[0] == labels).float().mean().item()

    real = D.load(args.data, args.data_root, split="test", limit=args.n)
    print(f"real test images: {accuracy(real.images, real.labels):.1%}; with noise sigma {args.sigma:g}: "
          f"{accuracy(noisy(real.images, args.sigma), real.labels):.1%}")
    for path in args.models.split(","):
        model, cfg, _ = load_model(path, torch.device("cpu"))
        labels = torch.arange(args.n) % cfg.model.num_classes
        imgs = generate(model, of(cfg.diffusion),
                        SamplerSpec("ddim", 50, args.guidance), labels=labels.tolist(), seeds=list(range(args.n)))
        print(f"{path} ({cfg.diffusion.prediction}, guidance {args.guidance:g}): raw {accuracy(imgs, labels):.1%}, "
              f"blurred {accuracy(blur(imgs), labels):.1%}")


if __name__ == "__main__":
    main()
