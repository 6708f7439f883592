"""Datasets by name, image folders, and the built-in `shapes`; the [-1, 1] pixel convention.

Every dataset is loaded once into memory as uint8 (N, C, H, W) with int64 labels:
the datasets this tool targets (MNIST 47 MB, CIFAR-10 150 MB as uint8) fit easily,
and indexing a tensor is far cheaper per batch than a DataLoader of PIL images.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcli.errors import UserError

log = logging.getLogger("diffcli")

NAMED = ("shapes", "mnist", "fashion-mnist", "cifar10")


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,); all 0 when unconditional
    class_names: list[str]  # [] for an unconditional dataset
    name: str

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
    only the first `limit` images if given. `split="test"` gives the held-out images of a
    named dataset (evaluation and the reference classifier); folders have only one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "shapes":
        full = SHAPES_PER_CLASS if split == "train" else SHAPES_TEST_PER_CLASS
        per_class = full if limit is None else min(full, -(-limit // len(SHAPES)))
        # One fixed dataset, like MNIST; the test split is drawn from another seed.
        data = make_shapes(size=image_size or 32, per_class=per_class, seed=0 if split == "train" else 1)
        return _first(data, limit)
    if name in ("mnist", "fashion-mnist", "cifar10"):
        data = load_torchvision(name, Path(root).expanduser() if root else default_root(), split)
    elif split != "train":
        raise UserError(f"'{name}' is a folder of images, which has no separate {split} split.")
    elif Path(name).expanduser().is_dir():
        data = load_folder(Path(name).expanduser(), image_size)
    elif Path(name).expanduser().exists():
        raise UserError(f"--data '{name}' is a file; give a dataset name ({', '.join(NAMED)}) or a folder of images.")
    else:
        raise UserError(f"--data '{name}' is neither a dataset name ({', '.join(NAMED)}) nor an existing folder.")
    data = _first(data, limit)
    if image_size and image_size != data.images.shape[-1]:
        data.images = resize(data.images, image_size)
    return data


def _first(data: ImageData, limit: int | None) -> ImageData:
    if limit is not None:
        data.images, data.labels = data.images[:limit], data.labels[:limit]
    return data


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
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder '{root}' ({e.strerror}).") from None
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror should fail, not hang
    try:
        ds = cls(str(root), train=split == "train", download=True)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... when offline
        where = root / folder if folder != "." else root
        raise UserError(
            f"{name} is not in '{where}' and could not be downloaded ({type(e).__name__}); "
            f"put {' and '.join(files)} there (or pass --data-root to the folder holding {folder}) and run again."
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


# --- image folders ---------------------------------------------------------

def load_folder(path: Path, image_size: int | None) -> ImageData:
    """Class = sub-folder name; with no sub-folders holding images, one unlabelled class.

    Images are center-cropped to squares and resized to `image_size` (default: their
    shared size when they are all the same square size, else 32). Grayscale folders
    give 1 channel, anything else 3. Unreadable files are skipped with a warning
    naming them.
    """
    from diffcli.images import IMAGE_EXTENSIONS, center_square, open_image, pil_to_tensor

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and images_in(d))
    if subdirs:
        entries = [(p, i) for i, d in enumerate(subdirs) for p in images_in(d)]
        class_names = [d.name for d in subdirs]
    else:
        entries = [(p, 0) for p in images_in(path)]
        class_names = []
    if not entries:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in '{path}' or its sub-folders.")

    opened, labels, skipped = [], [], []
    for p, label in entries:
        try:
            opened.append(open_image(p))
            labels.append(label)
        except ValueError as e:
            skipped.append(p)
            log.warning("skipping %s: %s", p, e)
    if not opened:
        raise UserError(f"none of the {len(entries)} image files in '{path}' could be read.")
    channels = 1 if all(im.mode == "L" for im in opened) else 3
    if image_size is None:
        sizes = {im.size for im in opened}
        (w, h), = sizes if len(sizes) == 1 else {(32, 32)}
        image_size = w if w == h else 32
    tensors = [pil_to_tensor(center_square(im.convert("L" if channels == 1 else "RGB"), image_size)) for im in opened]
    return ImageData(torch.stack(tensors), torch.tensor(labels, dtype=torch.long), class_names, str(path))


# --- the built-in `shapes` dataset -------------------------------------------

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "heart", "crescent", "half-disc", "arrow")
SHAPES_PER_CLASS = 3000  # 30k images: enough variety for minutes of training, ~5 s to build
SHAPES_TEST_PER_CLASS = 500  # the held-out split: 5k images, enough for per-class accuracy and feature statistics


def _polygon(kind: str) -> list[list[tuple[float, float]]]:
    """Outlines in unit coordinates (radius ~1, centred at 0). The first polygon is
    filled, later ones are cut out (for the ring and the crescent)."""
    def regular(n, r=1.0, phase=0.0):
        return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "circle":
        return [regular(64)]
    if kind == "square":
        return [regular(4, 1.0, math.pi / 4)]
    if kind == "triangle":
        return [[(x, y + 0.15) for x, y in regular(3, 1.1, -math.pi / 2)]]
    if kind == "ring":
        return [regular(64), regular(64, 0.55)]
    if kind == "cross":
        a = 0.3
        return [[(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]]
    if kind == "star":
        return [[p for k in range(5) for p in (regular(10, 1.0, -math.pi / 2)[2 * k], regular(10, 0.42, -math.pi / 2)[2 * k + 1])]]
    if kind == "heart":
        pts = []
        for k in range(64):
            s = 2 * math.pi * k / 64
            x = 16 * math.sin(s) ** 3
            y = 13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s) - math.cos(4 * s)
            pts.append((x / 17, -(y + 3) / 17))
        return [pts]
    if kind == "crescent":
        return [regular(64), [(x + 0.45, y - 0.2) for x, y in regular(64, 0.85)]]
    if kind == "half-disc":
        return [[(math.cos(math.pi * k / 32), -math.sin(math.pi * k / 32) + 0.4) for k in range(33)]]
    if kind == "arrow":
        return [[(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]]
    raise ValueError(kind)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return rgb @ torch.tensor([0.299, 0.587, 0.114])


def make_shapes(size: int = 32, per_class: int = SHAPES_PER_CLASS, seed: int = 0) -> ImageData:
    """10 classes of coloured shapes with random position, size, rotation and colours on
    backgrounds of varied colour with a gentle gradient. Deterministic from `seed`; shapes are drawn at 4x
    and box-filtered down, so edges are antialiased."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    n = per_class * len(SHAPES)
    labels = torch.arange(n) % len(SHAPES)
    ss = 4 * size  # supersampling
    outlines = [_polygon(k) for k in SHAPES]

    # Nuisance variation is kept moderate (rotation within ±30° of upright, radius 30-42% of
    # the image, the shape kept whole inside it, a gentle gradient) so a few CPU minutes go
    # into learning the outlines: with full 360° rotation a 3-minute run still drew blobs.
    radius = (0.30 + 0.12 * torch.rand(n, generator=g)) * size
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(60)
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * 0.9 * (size - 2 * radius)
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * 0.9 * (size - 2 * radius)

    # Background: a random colour with a gentle gradient (±0.15) along a random direction.
    # Foreground: a colour whose brightness differs from the background's by at least 0.35.
    base = torch.rand(n, 3, generator=g) * 0.7 + 0.15
    tilt = (torch.rand(n, 3, generator=g) - 0.5) * 0.3
    bg = torch.stack([base - tilt, base + tilt], dim=1).clamp(0, 1)
    fg = torch.rand(n, 3, generator=g)
    for _ in range(100):
        bad = (_luma(fg) - _luma(bg).mean(1)).abs() < 0.35
        if not bad.any():
            break
        fg[bad] = torch.rand(int(bad.sum()), 3, generator=g)
    direction = torch.rand(n, generator=g) * 2 * math.pi

    buf = bytearray()
    for label, r, a, x0, y0 in zip(labels.tolist(), (4 * radius).tolist(), angle.tolist(), (4 * cx).tolist(), (4 * cy).tolist()):
        canvas = Image.new("L", (ss, ss), 0)
        draw = ImageDraw.Draw(canvas)
        c, s = math.cos(a), math.sin(a)
        for j, poly in enumerate(outlines[label]):
            draw.polygon([(x0 + r * (c * x - s * y), y0 + r * (s * x + c * y)) for x, y in poly], fill=255 if j == 0 else 0)
        buf += canvas.resize((size, size), Image.BOX).tobytes()
    masks = torch.frombuffer(buf, dtype=torch.uint8).view(n, 1, size, size).float() / 255

    coords = (torch.arange(size) + 0.5) / size - 0.5
    u = torch.cos(direction)[:, None, None] * coords[None, None, :] + torch.sin(direction)[:, None, None] * coords[None, :, None]
    u = (u / 1.42 + 0.5).clamp(0, 1)[:, None]  # (n, 1, H, W) in [0, 1]
    background = bg[:, 0, :, None, None] * (1 - u) + bg[:, 1, :, None, None] * u
    images = background * (1 - masks) + fg[:, :, None, None] * masks
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, list(SHAPES), "shapes")
