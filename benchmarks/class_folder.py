"""Some classes of a dataset as a folder `--data` reads: OUT/train/CLASS/*.png and, where the
dataset has a test split, OUT/test/CLASS/*.png. A subset of a set makes a new set with its own
character: docs/results.md, "A second reading", tested the guidance rule on two made this way.

    python benchmarks/class_folder.py fashion-mnist --classes 0,2,4,6 --out tops    # T-shirt/top, pullover, coat, shirt
    python benchmarks/class_folder.py cifar10-jpeg.tar.gz --classes airplane,frog --out pair

Classes are named or numbered (in the dataset's order); the pictures are written as the
dataset holds them (grey stays grey), named by their index in the split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from diffcli import data as D
from diffcli.cli._common import parse_labels
from diffcli.errors import UserError


def write(split: D.ImageData, classes: list[int], folder: Path, limit: int | None) -> int:
    """Each chosen class's pictures (its first `limit`) as PNGs under folder/CLASS; how many."""
    written = 0
    for k in classes:
        out = folder / split.class_names[k].replace("/", "-")
        out.mkdir(parents=True, exist_ok=True)
        for i in (split.labels == k).nonzero().flatten()[:limit].tolist():
            pixels = split.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(out / f"{i:05d}.png")
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="what --data takes: a named dataset, a folder or an archive")
    p.add_argument("--classes", required=True, help="names or numbers, comma-separated")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=None, help="pictures a class and split (default: all)")
    args = p.parse_args()
    train = D.load(args.data, args.data_root)
    try:
        classes = parse_labels(args.classes, train.class_names, "--classes")  # as `sample --label` reads them
    except UserError as e:
        raise SystemExit(str(e)) from None
    print(f"train: {write(train, classes, args.out / 'train', args.limit):,} pictures")
    test = D.test_split(args.data, args.data_root)
    if test is not None:
        print(f"test: {write(test, classes, args.out / 'test', args.limit):,} pictures")


if __name__ == "__main__":
    main()
