"""Classifier-FD measured several ways, for several models and judges: how far a model's ratio
to the real floor depends on the judge and on how the distance is taken (docs/results.md,
"How much the weight depends on the judge").

    python benchmarks/fd_forms.py --models runs/before/model.safetensors@1.25,runs/cifar-10/model.safetensors \\
        --classifiers runs/cifar-classifier.safetensors,plain-classifier.safetensors

Each model draws `--n` images per class as `diffcli eval` does (its default sampling, or
the weight after the last `@`, seeds from `--seed`), against eval's floor (as many real
images the reference does not hold). The constructions:

- features: eval's own (`class_fidelity`), the judge's pooled features against every
  reference image;
- n against n: the same, against as many reference images as samples (drawn by seed + 1);
- logits, softmax: the judge's logits or class probabilities in place of its features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffcli import metrics
from diffcli.classifier import load_classifier, predict
from diffcli.evaluation import EvalOptions, class_fidelity, evaluate, floor_images, prepare
from diffcli.spec import SamplerSpec

FORMS = ("features", "n against n", "logits", "softmax", "softmax, n against n")


def representations(clf, images: torch.Tensor) -> dict[str, torch.Tensor]:
    feats = predict(clf, images)[1]
    with torch.no_grad():
        logits = clf.head(feats)  # (eval mode: the head's dropout passes everything)
    return {"features": feats, "logits": logits, "softmax": logits.softmax(-1)}


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return metrics.frechet_distance(*metrics.mean_cov(a.double()), *metrics.mean_cov(b.double()))


def distances(clf, samples, labels, floor, reference, reference_n, known: dict) -> dict[str, tuple[float, float]]:
    """{form: (FD of the samples, FD of the floor)}, each against its form's reference;
    `known` keeps the reference's representations between models."""
    eval_own = class_fidelity(clf, samples, labels, reference, floor)
    if "reference" not in known:
        known["reference"] = representations(clf, reference)
    s, f, r, r_n = representations(clf, samples), representations(clf, floor), known["reference"], representations(clf, reference_n)
    return {"features": (eval_own["classifier_fd"], eval_own["classifier_fd_real_floor"]),
            "n against n": (fd(s["features"], r_n["features"]), fd(f["features"], r_n["features"])),
            "logits": (fd(s["logits"], r["logits"]), fd(f["logits"], r["logits"])),
            "softmax": (fd(s["softmax"], r["softmax"]), fd(f["softmax"], r["softmax"])),
            "softmax, n against n": (fd(s["softmax"], r_n["softmax"]), fd(f["softmax"], r_n["softmax"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="comma-separated model files, each optionally @WEIGHT")
    p.add_argument("--classifiers", required=True, help="comma-separated classifier files of the models' data")
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    a = p.parse_args()
    judges = {Path(c).name: load_classifier(c)[0] for c in a.classifiers.split(",")}
    known: dict[tuple, dict] = {}
    print("| model | judge | " + " | ".join(FORMS) + " |")
    print("|---" * (len(FORMS) + 2) + "|")
    for item in a.models.split(","):
        path, at, weight = item.rpartition("@")
        path, weight = (path, weight) if at else (item, "")
        opts = EvalOptions(Path(path), SamplerSpec(steps=a.steps, guidance=float(weight) if weight else None), a.n, a.seed,
                           memorisation=False, data_root=a.data_root)
        got = prepare(opts, "cpu")
        report, samples, _ = evaluate(got.model, got.cfg, got.meta["class_names"], opts, got.real)
        labels = torch.tensor([k for k in range(max(1, len(got.meta["class_names"]))) for _ in range(a.n)])
        reference = got.real.reference.images
        reference_n = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(a.seed + 1))[:len(samples)]]
        floor = floor_images(got.real, len(samples), a.seed)
        weight_text = "unguided" if report["guidance"] is None else f"at {report['guidance']:g}"
        for name, clf in judges.items():
            measured = distances(clf, samples, labels, floor, reference, reference_n, known.setdefault((name, got.real.key), {}))
            cells = [f"{s:.3f} ({s / f:.1f}×)" if f > 0 else f"{s:.3f}" for s, f in (measured[form] for form in FORMS)]
            print(f"| {path} {weight_text} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
