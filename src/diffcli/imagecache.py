"""The decoded-image cache: each image folder or archive decoded once, then memory-mapped.

Decoding 50,000 JPEGs takes 13 s on a 2-core laptop-class CPU, so each source is decoded
once into `<data root>/decoded/<key>/`: per split, the raw uint8 (N, C, H, W) pixels and
int64 labels, and a meta.json. The key hashes the source's bytes (a changed image
rebuilds it, `folders.source_digest`) and the decoding settings. Later starts map the
pixels (`torch.from_file`, copy-on-write): the pages come from the OS page cache, so
torchrun's ranks on one machine share one copy instead of holding one each.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcli.errors import UserError
from diffcli.files import umask
from diffcli.folders import contents, layout, names_in, source_digest

log = logging.getLogger("diffcli")

# The entries whose decoding warnings this process has shown: a later start repeats them once
# (what a damaged archive or a broken link left out), since only the decoding start saw them.
_REMINDED: set[Path] = set()

CACHE_FORMAT = 2  # part of every key: bump it when decoding changes, so older caches are not read (2: float TIFFs, test sizes)


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
    digest = source_digest(source)
    folder = _cached(cache_root, digest, image_size)
    if folder is None:
        with _Kept() as kept:
            decoded, classes = _decode_source(source, image_size)
        folder = _write(cache_root / cache_key(digest, image_size), decoded, classes, source, kept.messages)
        if folder is None or (meta := _entry(folder)) is None:  # a data root that cannot be written: this run keeps its own copy
            found, how = decoded.get(split), "decoded (the cache could not be written)"
            return None if found is None else Decoded(*found, classes, f"{how} in {time.monotonic() - started:.2f} s")
        how = f"decoded into the cache {folder}"
        _REMINDED.add(folder)  # its warnings were just given
    else:
        how, meta = f"read from the cache {folder}", json.loads((folder / "meta.json").read_text())
    if folder not in _REMINDED and isinstance(warned := meta.get("warnings"), list) and warned:
        log.warning("when '%s' was decoded into the cache: %s%s (kept in %s)", source, warned[0],
                    f", and {len(warned) - 1} more warning(s)" if len(warned) > 1 else "", folder / "meta.json")
    _REMINDED.add(folder)  # each split loads the entry: one reminder a process
    if split not in meta["splits"]:
        return None
    shape = meta["splits"][split]["shape"]
    images = _mapped(folder / f"{split}-images.u8", torch.uint8, shape)
    labels = _mapped(folder / f"{split}-labels.i64", torch.int64, [shape[0]])
    return Decoded(images, labels, meta["class_names"], f"{how} in {time.monotonic() - started:.2f} s")


def _cached(cache_root: Path, digest: str, image_size: int | None) -> Path | None:
    """The cache entry for this source at this size: its own, or the one decoded at the
    images' own size when that is the size asked for (eval names the size training left out)."""
    for size in (image_size, None) if image_size else (None,):
        folder = cache_root / cache_key(digest, size)
        if folder.exists() and (meta := _entry(folder)) is not None:
            if size == image_size or meta["splits"]["train"]["shape"][-1] == image_size:
                return folder
    return None


def _entry(folder: Path) -> dict | None:
    """The entry's meta.json where every file it names is whole; else None, with a warning, and
    the entry is moved out of the way so that it is decoded again (a disk that filled or failed,
    an edit: it was a traceback on every start)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta["class_names"], list) or len(meta["splits"]["train"]["shape"]) != 4:
            raise ValueError("meta.json lacks the class names or the training split's shape")
        for split, info in meta["splits"].items():
            shape = info["shape"]
            if ((folder / f"{split}-images.u8").stat().st_size != math.prod(shape)
                    or (folder / f"{split}-labels.i64").stat().st_size != 8 * shape[0]):
                raise ValueError(f"{split}-images.u8 or {split}-labels.i64 is not the size meta.json gives")
        return meta
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        log.warning("the decoded-image cache entry %s is damaged (%s); decoding the source again", folder, str(e).splitlines()[0][:120])
        try:
            os.rename(folder, aside := folder.with_name(f".{folder.name}.damaged.{os.getpid()}"))
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass  # (another process moved it first, or the root is read-only: this run keeps its images in memory)
        return None


def _mapped(path: Path, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A copy-on-write map of the file: pages are read from the OS page cache, shared by
    every process that maps them, and nothing written to the tensor reaches the file."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=dtype).view(shape)


def cache_key(digest: str, image_size: int | None) -> str:
    """The cache folder's name: the source's digest and how it was decoded."""
    return hashlib.sha256(f"{digest} format {CACHE_FORMAT} size {image_size}".encode()).hexdigest()[:24]


# --- decoding into the cache -------------------------------------------------------

class _MixedSizes(Exception):
    """The images are not all one square size, so the default size is not theirs."""


def _decode_source(source: Path, image_size: int | None) -> tuple[dict, list[str]]:
    """({split: (uint8 images, int64 labels)}, class names): every image decoded once."""
    names = names_in(source)
    if not names:
        from diffcli.files import IMAGE_EXTENSIONS

        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in '{source}' or its sub-folders.")
    splits, classes = layout(names)
    with _Kept() as said:
        try:
            decoded = _decode(source, splits, image_size)
        except _MixedSizes:
            said_once = lambda record: record.getMessage() not in said.messages  # noqa: E731  (a skipped file, once)
            log.addFilter(said_once)
            try:
                decoded = _decode(source, splits, 32)  # the default for mixed sizes (docs/data.md)
            finally:
                log.removeFilter(said_once)
    if not len(decoded["train"][1]):
        raise UserError(f"none of the {len(splits['train'])} training image files in '{source}' could be read.")
    if "test" in decoded and not len(decoded["test"][1]):
        log.warning("none of the test split's images could be read; a share of the training images is held out instead")
        del decoded["test"]
    return decoded, classes


class _Kept(logging.Handler):
    """Keeps the text of each warning logged while it is entered, so the cache can repeat them."""

    def __enter__(self) -> "_Kept":
        self.messages: list[str] = []
        log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        log.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def _write(folder: Path, decoded: dict, classes: list[str], source: Path, warnings: list[str]) -> Path | None:
    """Write the cache entry through a temporary folder renamed into place (a reader sees
    all of it or none); None, with a warning, where the data root cannot be written."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        meta = {"format": CACHE_FORMAT, "source": str(source), "class_names": classes, "warnings": warnings, "splits": {}}
        for split, (images, labels) in decoded.items():
            images.numpy().tofile(tmp / f"{split}-images.u8")
            labels.numpy().tofile(tmp / f"{split}-labels.i64")
            meta["splits"][split] = {"shape": list(images.shape)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700: a shared data root is for every user
        os.rename(tmp, folder)
    except OSError as e:
        if not (folder / "meta.json").is_file():  # unless another process finished it first
            log.warning("cannot write the decoded-image cache in %s (%s); keeping the images in memory", folder.parent, e.strerror)
            return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _opened(name: str, data: bytes):
    """The picture in `data`, or None with a warning naming the file."""
    from diffcli.images import open_image

    try:
        return open_image(io.BytesIO(data))
    except ValueError as e:
        log.warning("skipping %s: %s", name, e)
        return None


def _decode(source: Path, splits: dict, image_size: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (uint8 (N, C, H, W), int64 labels)}, each split in name order. With no
    `image_size`, the training images' own size when they share one square size (else
    _MixedSizes); test images of another size are fitted to it, since the model is trained
    at the training images' size."""
    from diffcli.images import center_square, pil_to_tensor

    where = {name: (split, label) for split, members in splits.items() for name, label in members}
    found = {split: [] for split in splits}
    waiting = []  # test images, kept compressed until the training images' size is known (test/ may come first)
    native = None
    for name, data in contents(source, set(where)):
        split, label = where[name]
        if image_size is None and split != "train":
            waiting.append((split, name, data, label))
            continue
        if (img := _opened(name, data)) is None:
            continue
        if image_size is None:
            native = native or img.size
            if img.size != native or img.width != img.height:
                raise _MixedSizes
        found[split].append((name, pil_to_tensor(center_square(img, image_size or img.width)), label))
    size = image_size or (native[0] if native else 32)
    for split, name, data, label in waiting:
        if (img := _opened(name, data)) is not None:
            found[split].append((name, pil_to_tensor(center_square(img, size)), label))
    rgb = any(t.shape[0] == 3 for members in found.values() for _, t, _ in members)
    out = {}
    for split, members in found.items():
        members.sort(key=lambda m: m[0])
        tensors = [t.expand(3, -1, -1) if rgb else t for _, t, _ in members]  # grey as RGB: PIL's own conversion
        images = torch.stack(tensors) if tensors else torch.empty(0, 3 if rgb else 1, size, size, dtype=torch.uint8)
        out[split] = (images.contiguous(), torch.tensor([label for _, _, label in members], dtype=torch.long))
    return out
