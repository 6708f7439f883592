"""`diffcli eval`: how good are a model's samples, in numbers.

- class fidelity: the reference classifier's accuracy on images generated for each
  class, and the Fréchet distance between generated and real test images in the
  classifier's feature space (comparable between models of one dataset only);
- memorisation: each sample's distance to its nearest training image, against the
  same distance for real held-out images (a model that copies its training set
  makes samples much closer to it than new real images are);
- FID (inception.py): the standard Inception-v3 Fréchet distance, when asked for.

The maths lives in metrics.py; this module feeds it images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcli import metrics
from diffcli.classifier import Classifier, per_class_accuracy, predict

CLOSE_PERCENTILE = 1.0  # a sample is "close" when nearer its training neighbour than 99% of real held-out images are


@dataclass
class Sampling:
    """How the evaluated images are drawn (the options of `diffcli eval`)."""
    n_per_class: int = 100  # 1,000 images for 10 classes: per-class accuracy to ±3 points, FD stable to a few %
    sampler: str = "ddim"
    steps: int | None = None  # None: the sampler's default
    guidance: float | None = None  # None: DEFAULT_GUIDANCE
    seed: int = 0
    batch_size: int = 250


def class_fidelity(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, real_images: torch.Tensor,
                   floor_images: torch.Tensor | None = None) -> dict:
    """Accuracy (overall, per class) of `clf` on generated `images` meant to show `labels`,
    and the Fréchet distance of their features to those of `real_images`.

    `floor_images`: real images, as many as generated, not among `real_images`; their
    distance to `real_images` is what a perfect generator would score at this sample size
    (the Fréchet distance is biased upwards for small samples, Chong & Forsyth 2020).
    """
    predicted, feats = predict(clf, images)
    _, real_feats = predict(clf, real_images)
    real_stats = metrics.mean_cov(real_feats)
    out = {
        "class_accuracy": float((predicted == labels).float().mean()),
        "per_class_accuracy": per_class_accuracy(predicted, labels, clf.cfg.num_classes),
        "classifier_fd": metrics.frechet_distance(*metrics.mean_cov(feats), *real_stats),
    }
    if floor_images is not None:
        out["classifier_fd_real_floor"] = metrics.frechet_distance(*metrics.mean_cov(predict(clf, floor_images)[1]), *real_stats)
    return out


def memorisation(generated: torch.Tensor, train_images: torch.Tensor, real_held_out: torch.Tensor,
                 reference_pool: torch.Tensor | None = None) -> dict:
    """Nearest-training-image distances of generated images against those of real held-out
    images, as RMS pixel differences on a 0..1 scale.

    `reference_pool`: the training images the held-out ones are compared with (default:
    `train_images`; for a folder, the training images minus the held-out share).
    Returns medians, their ratio (about 1 for a model that generalises, much below 1
    for one that copies), the share of samples closer than the CLOSE_PERCENTILE-th
    percentile of real images (about CLOSE_PERCENTILE % when nothing is copied) and
    `nearest` (index of each sample's nearest training image) and `distances`.
    """
    flat = lambda x: x.flatten(1).float() / 255  # noqa: E731
    pool = flat(train_images)
    gen_d, gen_idx = metrics.nearest_neighbours(flat(generated), pool)
    real_d, _ = metrics.nearest_neighbours(flat(real_held_out), pool if reference_pool is None else flat(reference_pool))
    scale = pool.shape[1] ** 0.5  # L2 -> RMS per pixel
    gen_d, real_d = gen_d / scale, real_d / scale
    threshold = torch.quantile(real_d.double(), CLOSE_PERCENTILE / 100).item()
    return {
        "nn_distance_generated": float(gen_d.median()),
        "nn_distance_real": float(real_d.median()),
        "nn_ratio": float(gen_d.median() / real_d.median()),
        "close_share": float((gen_d < threshold).float().mean()),
        "close_threshold": threshold,
        "nearest": gen_idx,
        "distances": gen_d,
    }
