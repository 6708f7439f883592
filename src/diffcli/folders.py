"""Image folders and archives of them (.tar, .tar.gz, .zip), decoded once into a cache.

Layout, as datasets are shipped (torchvision's ImageFolder, the CIFAR-10 and ImageNet
mirrors): a class is a sub-folder, holding its images at any depth; `train/` beside
`test/` (or `val/`) gives the two splits; a single top folder wrapping everything is
looked through. With no class folders, the images form one unlabelled class.

Decoding 50,000 JPEGs takes tens of seconds on a laptop CPU, so each source is decoded
once into `<data root>/decoded/<key>/`: per split, the raw uint8 (N, C, H, W) pixels and
int64 labels, and a meta.json. The key hashes the source's bytes (a changed image
rebuilds it) and the decoding settings. A later start memory-maps the pixels
(`torch.from_file`, a private read-only mapping): the pages come from the OS page cache,
so torchrun's ranks on one machine share one copy instead of holding one each.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from diffcli.errors import UserError

log = logging.getLogger("diffcli")

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
TEST_FOLDERS = ("test", "val", "valid", "validation")  # the held-out split's folder, in order of preference
CACHE_FORMAT = 1  # part of every key: bump it when decoding changes, so older caches are not read
MAX_MEMBER_BYTES = 256 << 20  # an archive member larger than this is not a picture for this tool


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVES)


@dataclass
class Decoded:
    """One split of a source: pixels, labels, classes, and where they came from."""
    images: torch.Tensor  # uint8 (N, C, H, W), memory-mapped from the cache
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]
    origin: str  # for the start-up table: a cache hit and its time, or what decoding took


def load(source: Path, cache_root: Path, image_size: int | None, split: str) -> Decoded | None:
    """The `split` ("train" or "test") of an image folder or archive, from the cache when it
    holds this source; None when the source has no such split (no test/ folder)."""
    started = time.monotonic()
    key = cache_key(source, image_size)
    folder = cache_root / key
    if not (folder / "meta.json").is_file():
        _build(source, image_size, folder)
        how = f"decoded into the cache {folder} in {{:.2f}} s"
    else:
        how = f"read from the cache {folder} in {{:.2f}} s"
    meta = json.loads((folder / "meta.json").read_text())
    if split not in meta["splits"]:
        return None
    shape = meta["splits"][split]["shape"]
    images = _mapped(folder / f"{split}-images.u8", torch.uint8, shape)
    labels = _mapped(folder / f"{split}-labels.i64", torch.int64, [shape[0]])
    return Decoded(images, labels, meta["class_names"], how.format(time.monotonic() - started))


def _mapped(path: Path, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=count, dtype=dtype).view(shape)


# --- which file is which ------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    from diffcli.images import IMAGE_EXTENSIONS

    parts = PurePosixPath(name).parts
    # hidden files and folders, and the resource forks macOS puts in zips (__MACOSX/, ._x.jpg)
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def layout(names: list[str]) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """({split: [(file, class index)]}, class names) for the image files `names` (relative,
    '/'-separated). Splits: "train", and "test" when a test/ (or val/) folder sits beside
    train/. Classes are the training split's sub-folders, in sorted order."""
    files = sorted((PurePosixPath(n).parts, n) for n in names)
    splits_here = lambda d: {p[d] for p, _ in files if len(p) > d + 2}  # noqa: E731  folders holding folders
    depth = 0
    # one folder wrapping everything, and holding folders itself: look inside it
    while "train" not in splits_here(depth) and len({p[depth] for p, _ in files}) == 1 \
            and all(len(p) > depth + 2 for p, _ in files):
        depth += 1
    tops = {p[depth] for p, _ in files if len(p) > depth + 1}
    if "train" in splits_here(depth) and tops <= {"train", *TEST_FOLDERS}:
        test = next((t for t in TEST_FOLDERS if t in tops), None)
        groups = {split: [(p[depth + 1:], n) for p, n in files if p[depth] == folder]
                  for split, folder in (("train", "train"), ("test", test)) if folder}
    else:  # a folder named train among class folders is a class
        groups = {"train": [(p[depth:], n) for p, n in files]}
    classes = sorted({rel[0] for rel, _ in groups["train"] if len(rel) > 1})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, members in groups.items():
        if not classes:
            out[split] = [(n, 0) for _, n in members]
            continue
        unknown = sorted({rel[0] for rel, _ in members if len(rel) > 1} - set(index))
        if unknown:
            raise UserError(f"the {split} split has class folder(s) {', '.join(unknown)} that the training split lacks.")
        out[split] = [(n, index[rel[0]]) for rel, n in members if len(rel) > 1]
        if len(out[split]) < len(members):
            log.warning("left out %d image(s) lying beside the class folders of the %s split",
                        len(members) - len(out[split]), split)
        if not out[split]:
            raise UserError(f"the {split} split holds no images inside class folders.")
    return out, classes


# --- reading a source -------------------------------------------------------------

def _folder_files(folder: Path) -> list[Path]:
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / f for f in sorted(files)]
    return [p for p in found if _is_image_name(p.relative_to(folder).as_posix())]


def _names(source: Path) -> list[str]:
    """The image files of a folder or an archive, as '/'-separated names within it."""
    if source.is_dir():
        return [p.relative_to(source).as_posix() for p in _folder_files(source)]
    try:
        if source.name.lower().endswith(".zip"):
            with zipfile.ZipFile(source) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir()]
        else:
            with tarfile.open(source, "r:*") as t:
                names = [m.name for m in t if m.isfile()]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"cannot read the archive '{source}' ({type(e).__name__}: {e}).") from None
    return [n for n in names if _is_image_name(n)]


def _contents(source: Path, wanted: set[str]):
    """(name, bytes) of each wanted file, in the source's own order; archives are read in
    one pass and never extracted to disk."""
    if source.is_dir():
        for name in sorted(wanted):
            yield name, (source / name).read_bytes()
    elif source.name.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                if info.filename in wanted and _small_enough(info.filename, info.file_size):
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(source, "r:*") as t:
            for m in t:
                if m.isfile() and m.name in wanted and _small_enough(m.name, m.size):
                    yield m.name, t.extractfile(m).read()


def _small_enough(name: str, size: int) -> bool:
    if size > MAX_MEMBER_BYTES:
        log.warning("skipping %s: %d MB, more than the %d MB diffcli reads from an archive",
                    name, size >> 20, MAX_MEMBER_BYTES >> 20)
        return False
    return True


def cache_key(source: Path, image_size: int | None) -> str:
    """A hash of the source's bytes (every image file of a folder, with its name) and of
    how it is decoded."""
    h = hashlib.sha256(f"diffcli decoded images, format {CACHE_FORMAT}, size {image_size}\n".encode())
    try:
        if source.is_dir():
            for p in _folder_files(source):
                data = p.read_bytes()
                h.update(f"{p.relative_to(source).as_posix()}\0{len(data)}\0".encode())
                h.update(data)
        else:
            with source.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read '{e.filename or source}' ({e.strerror}).") from None
    return h.hexdigest()[:24]


# --- decoding into the cache -------------------------------------------------------

class _MixedSizes(Exception):
    """The images are not all one square size, so the default size is not theirs."""


def _build(source: Path, image_size: int | None, folder: Path) -> None:
    names = _names(source)
    if not names:
        from diffcli.images import IMAGE_EXTENSIONS

        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in '{source}' or its sub-folders.")
    splits, classes = layout(names)
    try:
        decoded = _decode(source, splits, image_size)
    except _MixedSizes:
        decoded = _decode(source, splits, 32)  # the default for mixed sizes (docs/data.md)
    if not len(decoded["train"][1]):
        raise UserError(f"none of the {len(splits['train'])} training image files in '{source}' could be read.")
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "source": str(source), "class_names": classes, "splits": {}}
        for split, (images, labels) in decoded.items():
            images.numpy().tofile(tmp / f"{split}-images.u8")
            labels.numpy().tofile(tmp / f"{split}-labels.i64")
            meta["splits"][split] = {"shape": list(images.shape)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)  # atomic: a reader sees all of it or none
        except OSError:
            if not (folder / "meta.json").is_file():  # not another process finishing first
                raise
    except OSError as e:
        raise UserError(f"cannot write the decoded-image cache in '{folder.parent}' ({e.strerror}); "
                        f"pass --data-root to a writable folder.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode(source: Path, splits: dict, image_size: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (uint8 (N, C, H, W), int64 labels)}, each split in name order. With no
    `image_size`, the images' own size when they share one square size (else _MixedSizes)."""
    from diffcli.images import center_square, open_image, pil_to_tensor

    where = {name: (split, label) for split, members in splits.items() for name, label in members}
    found = {split: [] for split in splits}
    native = None
    for name, data in _contents(source, set(where)):
        try:
            img = open_image(io.BytesIO(data))
        except ValueError as e:
            log.warning("skipping %s: %s", name, e)
            continue
        if image_size is None:
            native = native or img.size
            if img.size != native or img.width != img.height:
                raise _MixedSizes
        split, label = where[name]
        found[split].append((name, pil_to_tensor(center_square(img, image_size or img.width)), label))
    rgb = any(t.shape[0] == 3 for members in found.values() for _, t, _ in members)
    out = {}
    for split, members in found.items():
        members.sort(key=lambda m: m[0])
        tensors = [t.expand(3, -1, -1) if rgb else t for _, t, _ in members]  # grey as RGB: PIL's own conversion
        size = image_size or (native[0] if native else 32)
        images = torch.stack(tensors) if tensors else torch.empty(0, 3 if rgb else 1, size, size, dtype=torch.uint8)
        out[split] = (images.contiguous(), torch.tensor([label for _, _, label in members], dtype=torch.long))
    return out
