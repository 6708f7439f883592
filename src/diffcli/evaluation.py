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

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcli import data as D
from diffcli import folders, metrics
from diffcli.classifier import Classifier, per_class_accuracy, predict, reference_split
from diffcli.distributed import World
from diffcli.errors import UserError, listed, writing
from diffcli.spec import SamplerSpec

log = logging.getLogger("diffcli")

CLOSE_PERCENTILE = 1.0  # a sample is "close" when nearer its training neighbour than 99% of real held-out images are


@dataclass(frozen=True)
class EvalOptions:
    """What `diffcli eval` measures and how its images are drawn."""
    ckpt: Path
    spec: SamplerSpec = SamplerSpec()
    n_per_class: int = 100  # 1,000 images for 10 classes: per-class accuracy to ±3 points
    seed: int = 0
    batch_size: int = 250
    classifier: Path | None = None  # class accuracy and classifier-FD
    fid: bool = False
    inception_weights: Path | None = None
    memorisation: bool = True
    pairs: Path | None = None  # write the closest sample/training-image pairs here
    data: str | None = None  # None: the model's training data
    data_root: str | None = None
    real_n: int | None = None  # keep only the first N real reference images


@dataclass
class Loaded:
    """What `prepare` loaded and checked: the model and what measures it (on ranks > 0 only the model)."""
    model: torch.nn.Module
    cfg: object  # config.RunConfig
    meta: dict
    clf: Classifier | None = None
    clf_meta: dict | None = None
    inception: tuple | None = None
    real: RealImages | None = None


def run(opts: EvalOptions, device, status=lambda text: contextlib.nullcontext(), world: World = World()) -> dict:
    """`prepare`, then `evaluate`. Returns the report of plain numbers (and writes the pairs
    sheet). Under torchrun (`world`) every rank draws its share of the images; rank 0 measures
    them all and the other ranks return {}."""
    if not (opts.classifier or opts.fid or opts.memorisation):
        raise UserError("nothing to measure: give --classifier, --fid, or leave --memorisation on.")
    got = prepare(opts, device, status, world)
    if not world.is_main:  # the other ranks only draw their share of the images
        evaluate(got.model, got.cfg, got.meta["class_names"], opts, None, world=world)
        return {}
    report, images, mem = evaluate(got.model, got.cfg, got.meta["class_names"], opts, got.real, got.clf, got.inception, status, world)
    if got.clf is not None:
        report["classifier"] = {"path": str(opts.classifier), "test_accuracy": got.clf_meta["test_accuracy"]}
    if opts.pairs and mem is not None:
        from diffcli.figures import pairs_sheet
        from diffcli.files import save_image

        with writing(opts.pairs):
            save_image(pairs_sheet(images, got.real.train.images, mem["nearest"], mem["distances"]), opts.pairs)
    return {"model": str(opts.ckpt), "dataset": opts.data or got.cfg.data.name,
            "class_names": got.meta["class_names"], **report}


def prepare(opts: EvalOptions, device, status=lambda text: contextlib.nullcontext(), world: World = World()) -> Loaded:
    """Load what `opts` names and check that it fits together, all before minutes of sampling."""
    from diffcli.checkpoint import load_model
    from diffcli.generate import check_count
    from diffcli.hub_files import IMPORTED

    model, cfg, meta = load_model(opts.ckpt, device)
    opts.spec.resolve(cfg.diffusion.timesteps, model.student, model.trained)  # a bad --steps should fail before the data loads
    check_count(max(1, len(meta["class_names"])) * opts.n_per_class, cfg.model.image_size, "lower --n")  # and too many images
    data_name, data_root = opts.data or cfg.data.name, opts.data_root or cfg.data.root
    if not opts.data and cfg.train.preset == IMPORTED:  # its data.name is the pipeline folder it came from
        raise UserError(f"this model was imported from the diffusers folder '{data_name}', which records no training images; "
                        "pass --data with the images to measure it against.")
    if not opts.data and data_name not in D.NAMED and not Path(data_name).expanduser().exists():
        raise UserError(f"this model's data '{data_name}' (as its config names it) is not there; pass --data with it or a copy.")
    if not world.is_main:
        return Loaded(model, cfg, meta)
    return Loaded(model, cfg, meta, *_measures(opts, cfg, meta, data_name, data_root, device, status))


def _measures(opts: EvalOptions, cfg, meta: dict, data_name: str, data_root, device, status) -> tuple:
    """The classifier, Inception and real images `opts` asks for, each checked against the
    model, all before sampling: a missing dataset should fail before minutes of work."""
    clf = clf_meta = inception = None
    if opts.classifier:
        clf, clf_meta = _matching_classifier(opts.classifier, cfg, meta, data_name, device)
    if opts.fid:
        from diffcli.inception import load_inception

        with status("loading Inception-v3 ..."):
            inception = load_inception(opts.inception_weights, device)
    with status(f"loading {data_name} ..."):
        real = real_images(data_name, data_root, cfg.model.image_size, opts.real_n)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if tuple(real.train.images.shape[1:]) != shape:
        raise UserError(f"'{data_name}' holds {tuple(real.train.images.shape[1:])} images but the model makes "
                        f"{shape}; pass --data with the model's training data.")
    if meta["class_names"] and real.train.class_names != meta["class_names"]:  # (another set given as --data)
        log.warning("'%s' has the classes %s, and the model %s: the figures compare its pictures with those of other classes",
                    data_name, listed(real.train.class_names, 5), listed(meta["class_names"], 5))
    if len(real.reference.labels) < 2:  # a Fréchet distance needs a covariance, the close share a percentile
        raise UserError(f"'{data_name}' leaves {len(real.reference.labels)} real image(s) the model never saw to measure "
                        "against, and eval needs at least 2: add a test/ folder or more images.")
    return clf, clf_meta, inception, real


def _matching_classifier(path: Path, cfg, meta: dict, data_name: str, device):
    from diffcli.classifier import load_classifier

    if not meta["class_names"]:
        raise UserError("this model was trained without classes, so there is no class fidelity to measure; drop --classifier.")
    clf, clf_meta = load_classifier(path, device)
    c, m = clf_meta["config"], cfg.model
    if (c.in_channels, c.image_size, c.num_classes) != (m.in_channels, m.image_size, m.num_classes):
        raise UserError(f"the classifier takes {c.image_size}x{c.image_size}x{c.in_channels} images of {c.num_classes} classes, "
                        f"but the model makes {m.image_size}x{m.image_size}x{m.in_channels} images "
                        f"of {m.num_classes}; train one with --data {data_name} --image-size {m.image_size}.")
    if clf_meta["class_names"] != meta["class_names"]:  # e.g. an MNIST classifier on a Fashion-MNIST model
        log.warning("the classifier's classes (%s) are not the model's (%s): its accuracy compares them by number",
                    listed(clf_meta["class_names"], 5), listed(meta["class_names"], 5))
    return clf, clf_meta


@dataclass
class RealImages:
    train: D.ImageData  # what the model was trained on
    reference: D.ImageData  # real images it never saw: the test split, or a held-out share of a folder
    pool: D.ImageData | None  # for a folder: the training images minus the held-out share
    key: str  # names this reference in the FID statistics cache
    known: dict = field(default_factory=dict)  # class_fidelity's figures of these images, kept between calls (a sweep)


def real_images(name: str, root: str | None, image_size: int, limit: int | None = None) -> RealImages:
    """The real images a model is measured against; `limit` keeps the first N reference images."""
    train = D.load(name, root, image_size)
    fit, reference, _ = reference_split(train, name, root, image_size)
    if name in D.NAMED:
        pool, source = None, f"{name}-test"
    else:  # a folder's own test/ split leaves every training image in the pool; keyed by content
        folder = "folder-" + folders.source_digest(Path(name).expanduser())[:12]
        pool, source = (None, f"{folder}-test") if fit is train else (fit, f"{folder}-held-out")
    if limit:  # (a folder's test/ comes sorted by class: its first N would be the first classes)
        reference = D.first(reference, limit, classes_in_turn=name not in D.NAMED)
    return RealImages(train, reference, pool, f"{source}{len(reference.labels)}-{image_size}px")


def evaluate(model, cfg, class_names: list[str], opts: EvalOptions, real: RealImages | None, clf: Classifier | None = None,
             inception: tuple | None = None, status=lambda text: contextlib.nullcontext(),
             world: World = World()) -> tuple[dict, torch.Tensor, dict | None]:
    """Sample `opts.n_per_class` images per class with `opts.spec` and measure them. Returns
    (report of plain numbers, the images, the memorisation result with its per-sample
    arrays or None). `inception` is (network, weights hash) from inception.load_inception;
    `status(text)` gives a context manager shown while each stage runs; `world`: see `run`."""
    from diffcli.devices import timed
    from diffcli.generate import generate
    from diffcli.objective import of

    spec = opts.spec.resolve(cfg.diffusion.timesteps, model.student, model.trained)
    labels = torch.tensor([k for k in (range(len(class_names)) or [0]) for _ in range(opts.n_per_class)])
    device = next(model.parameters()).device
    with status(f"sampling {len(labels)} images with {spec.sampler}, {spec.steps} steps ..."):
        images, seconds = timed(lambda: generate(model, of(cfg.diffusion), spec, labels=labels.tolist(),
                                                 seeds=list(range(opts.seed, opts.seed + len(labels))), batch_size=opts.batch_size,
                                                 world=world),
                                device)
    if not world.is_main:  # rank 0 measures
        return {}, images, None
    report = {"images": len(labels), "sampler": spec.sampler, "steps": spec.steps, "guidance": spec.guidance,
              **({"guidance_built_in": model.student.guidance} if model.student else {}),
              "guidance_interval": spec.interval, "shift": spec.shift, "eta": spec.eta, "seed": opts.seed, "sampling_s": round(seconds, 2)}
    if clf is not None:
        with status("classifying ..."):
            known = real.known.setdefault((id(clf), opts.seed, len(labels)), {})  # the same from one call to the next
            report.update(class_fidelity(clf, images, labels, real.reference.images, floor_images(real, len(labels), opts.seed),
                                         known))
    mem = None
    if opts.memorisation:
        with status("searching the nearest training images ..."):
            mem = memorisation(images, real.train.images, real.reference.images[:max(len(labels), 1000)],
                               None if real.pool is None else real.pool.images)
        report.update({k: v for k, v in mem.items() if k not in ("nearest", "distances")})
    if inception is not None:
        from diffcli import inception as fid

        net, weights_hash = inception
        with status("Inception statistics of the real images (once; then cached) ..."):
            mu, cov, cached = fid.real_stats(net, weights_hash, real.key, lambda: real.reference.images)
        with status("Inception features of the samples ..."):
            report["fid"] = fid.fid(net, images, mu, cov)
        report["fid_reference"] = f"{len(real.reference.labels)} real images never trained on ({'cached' if cached else 'computed now'})"
    return report, images, mem


def floor_images(real: RealImages, n: int, seed: int) -> torch.Tensor:
    """The floor's images: `n` real ones the reference does not hold, drawn by `seed`."""
    source = real.pool if real.pool is not None else real.train
    return source.images[torch.randperm(len(source.labels), generator=torch.Generator().manual_seed(seed))[:n]]


def class_fidelity(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, real_images: torch.Tensor,
                   floor_images: torch.Tensor | None = None, known: dict | None = None) -> dict:
    """Accuracy (overall, per class) of `clf` on generated `images` meant to show `labels`,
    and the Fréchet distance of their features to those of `real_images`.

    `floor_images`: real images, as many as generated, not among `real_images`; their
    distance to `real_images` is what a perfect generator would score at this sample size
    (the Fréchet distance is biased upwards for small samples, Chong & Forsyth 2020).
    `known`: a dict kept between calls with the same real images, floor and classifier, where
    what depends on them alone is computed once (the real features' statistics, the floor).
    """
    known = {} if known is None else known
    predicted, feats = predict(clf, images)
    if "real" not in known:
        known["real"] = metrics.mean_cov(predict(clf, real_images)[1])
    real_stats = known["real"]
    out = {
        "class_accuracy": float((predicted == labels).float().mean()),
        "per_class_accuracy": per_class_accuracy(predicted, labels, clf.cfg.num_classes),
        "classifier_fd": metrics.frechet_distance(*metrics.mean_cov(feats), *real_stats),
    }
    if floor_images is not None:
        if "floor" not in known:
            known["floor"] = metrics.frechet_distance(*metrics.mean_cov(predict(clf, floor_images)[1]), *real_stats)
        out["classifier_fd_real_floor"] = known["floor"]
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
