"""One row of a scored comparison: `diffcli eval`'s `evaluate` on a network, and a grid of
its pictures (one row per class, the same seeds in every row), as a markdown table row."""

from __future__ import annotations

from pathlib import Path

from diffcli.evaluation import EvalOptions, evaluate
from diffcli.generate import generate
from diffcli.files import save_image as save
from diffcli.images import grid
from diffcli.objective import of
from diffcli.spec import SamplerSpec

GRID_SEEDS = 8  # pictures: one row per class, these many seeds
HEADER = "| class accuracy | classifier-FD | × floor | picture |"


def scored_row(name: str, net, cfg, class_names: list[str], ckpt: Path, spec: SamplerSpec, n: int, seed: int, real, clf,
               picture: Path | None) -> tuple[str, dict]:
    """'| name | accuracy | FD | FD / floor | picture |' and the eval report; the grid is
    written to `picture` (a .png path) when one is given."""
    report, _, _ = evaluate(net, cfg, class_names, EvalOptions(ckpt, spec, n, seed, memorisation=False), real, clf)
    shown = ""
    if picture is not None:
        labels = [c for c in range(cfg.model.num_classes) for _ in range(GRID_SEEDS)]
        images = generate(net, of(cfg.diffusion), spec, labels=labels, seeds=list(range(GRID_SEEDS)) * cfg.model.num_classes)
        picture.parent.mkdir(parents=True, exist_ok=True)
        shown = f"![{picture.stem}]({save(grid(images, GRID_SEEDS), picture)})"
    floor = report["classifier_fd_real_floor"]
    return (f"| {name} | {report['class_accuracy']:.1%} | {report['classifier_fd']:.3f} | "
            f"{report['classifier_fd'] / floor:.2f} | {shown} |"), report
