"""Datasets by name, image folders, and the built-in `shapes`; the [-1, 1] pixel convention.

Every dataset is loaded once into memory as uint8 (N, C, H, W) with int64 labels:
the datasets this tool targets (MNIST 47 MB, CIFAR-10 150 MB as uint8) fit easily,
and indexing a tensor is far cheaper per batch than a DataLoader of PIL images.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffcli.errors import UserError
from diffcli.shapes import SHAPES, SHAPES_PER_CLASS, SHAPES_TEST_PER_CLASS
from diffcli.shapes import draw as draw_shapes

log = logging.getLogger("diffcli")

NAMED = ("shapes", "mnist", "fashion-mnist", "cifar10")


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,); all 0 when unconditional
    class_names: list[str]  # [] for an unconditional dataset
    name: str
    origin: str = ""  # how it was loaded, for the start-up table (a folder's cache hit, say)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- pixel convention -------------------------------------------------------

def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (DDPM's data scaling, Ho et al. 2020, §3.3)."""
    return images.float() / 127.5 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- entry point ---------------------------------------------------------------

def default_root() -> Path:
    env = os.environ.get("DIFFCLI_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "diffcli" / "datasets"


SPLITS = ("train", "test")


def load(name: str, root: str | None = None, image_size: int | None = None, limit: int | None = None,
         split: str = "train") -> ImageData:
    """Load a named dataset or an image folder, resized to `image_size` if given, keeping
    only the first `limit` images if given (a folder's from each class in turn).
    `split="test"` gives the held-out images of a named dataset (evaluation and the
    reference classifier); folders have only one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in NAMED and split == "train" and name in os.listdir("."):  # the exact name: a case-blind disk finds ./MNIST
        kind = "folder" if Path(name).is_dir() else "file"
        log.warning("'%s' is the named dataset, not the %s '%s' here; give './%s' to read the %s instead",
                    name, kind, name, name, kind)
    if name == "shapes":
        full = SHAPES_PER_CLASS if split == "train" else SHAPES_TEST_PER_CLASS
        per_class = full if limit is None else min(full, -(-limit // len(SHAPES)))
        # One fixed dataset, like MNIST; the test split is drawn from another seed.
        data = make_shapes(size=image_size or 32, per_class=per_class, seed=0 if split == "train" else 1)
        return first(data, limit)
    if name in ("mnist", "fashion-mnist", "cifar10"):
        data = first(load_torchvision(name, Path(root).expanduser() if root else default_root(), split), limit)
    else:
        data = load_source(name, root, image_size, split)
        if data is None:
            raise UserError(f"'{name}' has no {split}/ folder beside train/, so it has no separate {split} split.")
        data = first(data, limit, classes_in_turn=True)
    if image_size and image_size != data.images.shape[-1]:
        data.images = resize(data.images, image_size)
    return data


def test_split(name: str, root: str | None = None, image_size: int | None = None) -> ImageData | None:
    """The held-out images of `name`: a named dataset's test split, a folder's or archive's
    test/ (or val/) folder; None for a source with only one split."""
    if name in NAMED:
        return load(name, root, image_size, split="test")
    return load_source(name, root, image_size, "test")


def first(data: ImageData, limit: int | None, classes_in_turn: bool = False) -> ImageData:
    """The first `limit` images, as a new ImageData; `classes_in_turn` takes them from each
    class in turn (the first of every class, then the second, ...), for a folder, whose
    images come sorted by class: its first N would be all one class."""
    if limit is None or limit >= len(data.labels):
        return data
    keep = slice(0, limit)
    if classes_in_turn:
        by_class = torch.argsort(data.labels, stable=True)
        starts = torch.searchsorted(data.labels[by_class], data.labels[by_class])  # where each one's class begins
        turn = torch.empty_like(data.labels)
        turn[by_class] = torch.arange(len(by_class)) - starts  # its place within its class
        keep = torch.argsort(turn * (int(data.labels.max()) + 1) + data.labels, stable=True)[:limit].sort().values
    return replace(data, images=data.images[keep], labels=data.labels[keep])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 square images with antialiasing, in chunks to bound memory."""
    import torch.nn.functional as F

    out = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        .round().clamp(0, 255).to(torch.uint8)
        for chunk in images.split(4096)
    ]
    return torch.cat(out)


# --- torchvision datasets ----------------------------------------------------

_IDX_FILES = {"train": ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"],
              "test": ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]}
TORCHVISION = {
    # name: (class name, folder under root, {split: files a user can place there by hand})
    "mnist": ("MNIST", "MNIST/raw", _IDX_FILES),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", _IDX_FILES),
    "cifar10": ("CIFAR10", ".", {"train": ["cifar-10-python.tar.gz"], "test": ["cifar-10-python.tar.gz"]}),
}


def load_torchvision(name: str, root: Path, split: str = "train") -> ImageData:
    """Through torchvision's own classes and download code: files already in `root` are
    md5-checked and extracted, and nothing is downloaded when they are there.

    CIFAR-10's python batches are pickles; torchvision unpickles them only after their
    md5 matches the official release, so no file a user crafted is ever unpickled.
    """
    import socket

    import torchvision.datasets as tvd

    cls_name, folder, split_files = TORCHVISION[name]
    files = split_files[split]
    cls = getattr(tvd, cls_name)
    root = _writable_root(root, folder)
    if root.exists() and not root.is_dir():
        raise UserError(f"the data root '{root}' is a file; give a folder (--data-root or DIFFCLI_DATA_ROOT).")
    made = next((p for p in reversed([root / folder, *(root / folder).parents]) if not p.exists()), None)  # the highest new folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder '{root}' ({e.strerror}).") from None
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror should fail, not hang
    try:
        ds = cls(str(root), train=split == "train", download=True)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... when offline
        if made is not None and not any(p.is_file() for p in made.rglob("*")):  # leave no empty folders behind
            shutil.rmtree(made, ignore_errors=True)
        where = root / folder if folder != "." else root
        if all((where / f).is_file() for f in files):  # there, but not the official bytes: torchvision then downloads
            raise UserError(f"{name}'s {' and '.join(files)} in '{where}' are not the official files (damaged, cut short, "
                            f"or another release), and whole ones could not be downloaded ({type(e).__name__}); "
                            "replace them and run again.") from None
        raise UserError(
            f"{name} is not in '{where}' and could not be downloaded ({type(e).__name__}); "
            f"put {' and '.join(files)} there (or pass --data-root to the folder holding "
            f"{folder if folder != '.' else 'them' if len(files) > 1 else 'it'}) and run again."
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    if name == "cifar10":
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        class_names = list(ds.classes)
    else:
        images = ds.data.unsqueeze(1).contiguous()
        class_names = [str(i) for i in range(10)] if name == "mnist" else list(ds.classes)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return ImageData(images, labels, class_names, name)


def _writable_root(root: Path, folder: str) -> Path:
    """torchvision extracts archives next to themselves. When the files sit in a read-only
    folder (no write bits, e.g. a shared dataset directory), copy them into the cache
    first and read from there, instead of failing or writing into someone else's folder."""
    import hashlib
    import shutil
    import stat

    raw = root / folder
    if not raw.is_dir() or raw.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return root
    copy_root = default_root() / "read-only-copies" / hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
    target = copy_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for f in raw.iterdir():
        if f.is_file() and not (target / f.name).exists():
            shutil.copyfile(f, target / f.name)
    log.info("%s is read-only; reading a copy in %s", raw, target)
    return copy_root


# --- one image a user hands us ----------------------------------------------------

def read_image(path: Path):
    """`images.open_image` for a path from the command line: one sentence when it is
    missing, a folder, or not a readable image."""
    from diffcli.images import open_image

    if not path.exists():
        raise UserError(f"image '{path}' does not exist.")
    if path.is_dir():
        raise UserError(f"'{path}' is a folder; give an image file.")
    try:
        return open_image(path)
    except ValueError as e:
        raise UserError(f"cannot use '{path}': {e}.") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}' ({e.strerror}).") from None


def fit_image(img, channels: int, size: int) -> torch.Tensor:
    """A user's picture as a model input: centre-cropped to a square, resized to `size`,
    in the model's channels (grey or RGB); uint8 (C, H, W)."""
    from diffcli.images import center_square, pil_to_tensor

    return pil_to_tensor(center_square(img.convert("L" if channels == 1 else "RGB"), size))


def fit_mask(img, size: int) -> torch.Tensor:
    """A mask picture as bool (1, H, W), cropped and resized as `fit_image` does the image
    it goes with: True (white, lighter than mid-grey) marks what is to be redrawn."""
    return fit_image(img, 1, size) > 127


# --- image folders and archives (folders.py) ----------------------------------------

def load_source(name: str, root: str | None, image_size: int | None, split: str) -> ImageData | None:
    """A folder of images or an archive of one, through the decoded-image cache under
    the data root; None when it has no such split."""
    from diffcli import folders, imagecache

    path = Path(name).expanduser()
    if not path.is_dir() and not folders.is_archive(path):
        if path.exists():
            raise UserError(f"--data '{name}' is a file but not an archive ({', '.join(folders.ARCHIVES)}); "
                            f"give a dataset name ({', '.join(NAMED)}), a folder of images or an archive of one.")
        hint = f"; did you mean '{path.name.lower()}'?" if path.name.lower() in NAMED else "."  # names are lower case
        raise UserError(f"--data '{name}' is neither a dataset name ({', '.join(NAMED)}) nor an existing folder or archive{hint}")
    cache = (Path(root).expanduser() if root else default_root()) / "decoded"
    found = imagecache.load(path, cache, image_size, split)
    if found is None:
        return None
    return ImageData(found.images, found.labels, found.class_names, name, found.origin)


# --- the built-in `shapes` dataset (shapes.py draws it) -------------------------------

def make_shapes(size: int = 32, per_class: int = SHAPES_PER_CLASS, seed: int = 0) -> ImageData:
    images, labels = draw_shapes(size, per_class, seed)
    return ImageData(images, labels, list(SHAPES), "shapes")
