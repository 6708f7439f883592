"""The reference classifier behind `diffcli eval`: does a generated "3" look like a 3?

Two small networks (convnets.py), chosen by the images' channels (`arch_for`): a CNN for
grey digits, a ResNet-9 for colour images. Each is trained on a dataset's training split
and scored on its test split. Its pooled features (the layer
before the linear head) are the feature space of the classifier Fréchet distance. It
sees images in the model range [-1, 1] at the dataset's own size, so it needs no
resizing and no ImageNet weights; the price is that its numbers compare models of one
dataset only, never across datasets or with Inception FID.

Files are safetensors with metadata {"format": "diffcli-classifier", "config",
"class_names", "dataset", "test_accuracy", "per_class_accuracy", "test_images",
"augmented", "epochs"} ("augmented" absent from files made before `augment`, "epochs" from
files made before it was kept; files made before the ResNet have no "arch" in their config,
and are the CNN).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from diffcli import checkpoint
from diffcli.convnets import Classifier, ClassifierConfig, arch_for  # noqa: F401  (importers find them here)
from diffcli.data import ImageData, to_model_range
from diffcli.devices import autocast, fused_adamw, precision_for
from diffcli.errors import UserError

FORMAT = checkpoint.CLASSIFIER_FORMAT
SHIFT = 2  # random translation of up to ±2 px: the augmentation that gets MNIST past 99%
# What a judge of generated images must not be fooled by: a sampler's grain, softness and
# off colours. Trained on clean shapes, the classifier lost 38 points to noise of σ = 12/255
# and scored grainy samples below blurred ones (docs/results.md). Each is applied to half
# the images, independently, so an eighth of what it sees stays clean.
NOISE_MAX = 0.1  # Gaussian noise σ up to 0.1 in the model range [-1, 1] (13/255)
BLUR_MAX = 1.0  # Gaussian blur σ up to 1 px
CONTRAST, BRIGHTNESS, SATURATION = 0.3, 0.15, 0.5  # contrast 1 ± 0.3, brightness ± 0.15, saturation 1 ± 0.5


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes (N,), features (N, D) float32 on the CPU) for uint8 images."""
    device = next(model.parameters()).device
    model.eval()
    classes, feats = [], []
    for chunk in images.split(batch_size):
        f = model.features(to_model_range(chunk.to(device)))
        classes.append(model.head(f).argmax(1).cpu())
        feats.append(f.float().cpu())
    return torch.cat(classes), torch.cat(feats)


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-SHIFT, SHIFT], filling
    with the edge pixels (a digit's black background, a shape's backdrop)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour jitter for model-range images (N, C, H, W), each on a random half
    of them with its own random strength, so that the features of `diffcli eval` follow shape,
    not texture. Colour: contrast and brightness, and saturation for RGB."""
    n, c, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    on = lambda: (u(n) < 0.5).float().view(n, 1, 1, 1)  # noqa: E731
    # colour
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + CONTRAST * (2 * u(n, 1, 1, 1) - 1)
    bright = BRIGHTNESS * (2 * u(n, 1, 1, 1) - 1)
    coloured = (x - mean) * contrast + mean + bright
    if c == 3:
        grey = coloured.mean(1, keepdim=True)
        coloured = grey + (coloured - grey) * (1 + SATURATION * (2 * u(n, 1, 1, 1) - 1))
    pick = on()
    x = pick * coloured + (1 - pick) * x
    # blur: a separable Gaussian of its own σ per image, as one grouped convolution
    sigma = (BLUR_MAX * u(n)).clamp(min=1e-3)
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, 5)
    flat = nn.functional.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    flat = nn.functional.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    blurred = nn.functional.conv2d(flat, kernel[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    pick = on()
    x = pick * blurred + (1 - pick) * x
    # noise
    noise = torch.randn(x.shape, generator=gen) * (NOISE_MAX * u(n, 1, 1, 1))
    x = x + on() * noise
    return x.clamp(-1, 1)


def held_out(data: ImageData, share: float = 0.1, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, test) from one split, for image folders that come without a test split."""
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))
    k = max(1, round(len(order) * share))
    pick = lambda idx: ImageData(data.images[idx], data.labels[idx], data.class_names, data.name)  # noqa: E731
    return pick(order[k:]), pick(order[:k])


def reference_split(data: ImageData, name: str, root: str | None, image_size: int | None) -> tuple[ImageData, ImageData, str]:
    """(what to fit on, what to score on, what that is) for the training images `data` of
    dataset `name`: its own test split (a named dataset's, a folder's test/), or else a
    share of a folder held out."""
    from diffcli import data as D

    test = D.test_split(name, root, image_size)
    if test is not None:
        return data, test, "test split"
    fit, test = held_out(data)
    return fit, test, "10% held out"


def reference_splits(name: str, root: str | None, image_size: int | None,
                     limit: int | None = None) -> tuple[ImageData, ImageData, str]:
    """`reference_split` of a dataset loaded here, with the fitting images cut to `limit`."""
    from diffcli import data as D

    train, test, what = reference_split(D.load(name, root, image_size), name, root, image_size)
    if limit:
        train = ImageData(train.images[:limit], train.labels[:limit], train.class_names, train.name)
    return train, test, what


def default_epochs(channels: int, size: int) -> float:
    """10 epochs give the CNN 99.48% on MNIST and 91.3% on Fashion-MNIST (3 gave 99.29% and
    88.6%: a quarter of the errors more on both), in about 95 s on a 2-core AMD EPYC; the ResNet
    needs 16 for 85% on CIFAR-10's JPEG copy (84.2% at 10; 7 minutes on a 2-core Intel Xeon
    with AMX). docs/evaluation.md."""
    return 16 if arch_for(channels, size) == "resnet" else 10


def trained_short(meta: dict) -> int | None:
    """`default_epochs` for a classifier's images where it trained for fewer (it is then a
    weaker judge than `classifier train` makes); None where it did not, or did not say."""
    usual = default_epochs(meta["config"].in_channels, meta["config"].image_size)
    return usual if meta["epochs"] is not None and meta["epochs"] < usual else None


def train_classifier(train: ImageData, test: ImageData, epochs: float | None = None, batch_size: int = 128, lr: float = 3e-3,
                     width: int = ClassifierConfig.width, seed: int = 0, device: torch.device | str = "cpu",
                     report: Callable[..., None] | None = None, augmented: bool = True, flip: bool = False,
                     arch: str | None = None) -> tuple[Classifier, dict]:
    """Train on `train` (shifted, mirrored if `flip`, and `augment`ed unless `augmented` is
    False), then score on `test`; `flip` also makes the classifier judge mirror images
    together. `epochs`: default `default_epochs`. AdamW with a short warm-up and a cosine decay to zero (the
    one-cycle shape that converges fast in few epochs). `arch`: default `arch_for` the
    images' channels. Returns (model in eval mode, scores from `score` and the epochs trained).
    `report("step", step=, total=, loss=)` is called every step."""
    if train.num_classes < 2:
        raise UserError(f"'{train.name}' has {train.num_classes} class(es); a classifier needs at least 2 (sub-folders = classes).")
    device = torch.device(device)
    _, c, h, _ = train.images.shape
    epochs = epochs or default_epochs(c, h)
    torch.manual_seed(seed)  # initial weights (torch draws them from the global generator)
    cfg = ClassifierConfig(c, h, train.num_classes, width, arch or arch_for(c, h), mirror=flip)
    # The ResNet trains 1.4x faster in bf16 where the CPU has it, and in channels_last
    # (2,081 against 1,049 fp32 images/s at width 16, 2-core Intel Xeon with AMX); the
    # CNN's figures were measured in fp32 and keep it.
    precision = precision_for(device, "auto", width) if cfg.arch == "resnet" else "fp32"
    model = Classifier(cfg).to(device, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train.labels))  # a set smaller than one batch is one batch
    steps_per_epoch = max(1, len(train.labels) // batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = min(200, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4, fused=fused_adamw(device))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(train.labels), generator=gen)
        for idx in order[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size):
            x = shift(to_model_range(train.images[idx]), gen)
            if flip:
                x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
            x = (augment(x, gen) if augmented else x).to(device, memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = nn.functional.cross_entropy(model(x), train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if report:
                report("step", step=step, total=total, loss=loss.detach())  # a tensor: no sync unless shown
            if step == total:
                break
    model.eval()
    return model, {**score(model, test), "epochs": step / steps_per_epoch}  # (saved with its scores: what ran, in whole steps)


def score(model: Classifier, test: ImageData) -> dict:
    """Accuracy on labelled images, overall and per class, as saved with the classifier."""
    predicted, _ = predict(model, test.images)
    per_class = per_class_accuracy(predicted, test.labels, model.cfg.num_classes)
    return {"test_accuracy": float((predicted == test.labels).float().mean()), "per_class_accuracy": per_class,
            "test_images": len(test.labels)}


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Share of images of class k predicted as k, for each k (None where class k has no images)."""
    hits = torch.bincount(labels[predicted == labels], minlength=num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    return [float(h / n) if n else None for h, n in zip(hits.tolist(), counts.tolist())]


# --- files -----------------------------------------------------------------------

def save_classifier(path: Path, model: Classifier, class_names: list[str], dataset: str, scores: dict,
                    augmented: bool = True) -> None:
    metadata = {
        "augmented": json.dumps(augmented),
        "format": FORMAT,
        "config": json.dumps(asdict(model.cfg)),
        "class_names": json.dumps(class_names),
        "dataset": dataset,
        "test_accuracy": repr(scores["test_accuracy"]),
        "per_class_accuracy": json.dumps(scores["per_class_accuracy"]),
        "test_images": str(scores["test_images"]),
        **({"epochs": repr(float(scores["epochs"]))} if "epochs" in scores else {}),
    }
    checkpoint.save_tensors(path, model.state_dict(), metadata)


def classifier_metadata(header: dict) -> dict:
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise UserError("this file is not a diffcli classifier (make one with `diffcli classifier train`).")
    try:
        return {"config": ClassifierConfig(**json.loads(meta["config"])), "class_names": json.loads(meta["class_names"]),
                "dataset": meta.get("dataset", "?"), "test_accuracy": float(meta["test_accuracy"]),
                "per_class_accuracy": json.loads(meta["per_class_accuracy"]), "test_images": int(meta["test_images"]),
                "augmented": json.loads(meta.get("augmented", "false")),  # files before augmentation had none
                "epochs": _epochs(meta.get("epochs"))}
    except (KeyError, ValueError, TypeError):
        raise UserError("the metadata of this classifier file is damaged.") from None


def _epochs(text: str | None) -> float | None:
    """How long a classifier trained, where its file says so plainly: it only feeds a warning,
    so a value that is not a positive number reads as absent rather than as damage."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = classifier_metadata(checkpoint.read_header(path))
    model = Classifier(meta["config"])
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"'{path}' could not be loaded as a classifier: {str(e).splitlines()[0]}.") from None
    return model.to(device).eval(), meta
