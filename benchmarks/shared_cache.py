"""Each process's own memory when two processes load one dataset, as torchrun's ranks do:
diffcli's memory-mapped decoded-image cache against a private copy in each process (what
loading into a tensor, as before the cache, costs).

Memory is read from /proc/self/smaps_rollup after every pixel has been touched and while
both processes hold their images: "own" is Private_Clean + Private_Dirty (what would be
freed if the process ended), Pss splits the shared pages between the two. Linux only.

    python benchmarks/shared_cache.py ../shared/datasets/CIFAR-10-images/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import multiprocessing as mp


def rollup() -> dict[str, int]:
    """/proc/self/smaps_rollup in MiB."""
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if parts[0].endswith(":") and len(parts) > 1 and parts[1].isdigit():
            out[parts[0][:-1]] = int(parts[1]) / 1024
    return out


def rank(source: str, copy: bool, barrier, results) -> None:
    from diffcli import data as D

    before = rollup()
    images = D.load(source).images
    if copy:
        images = images.clone()
    int(images.sum())  # touch every page
    barrier.wait()  # both processes hold their images now
    after = rollup()
    own = lambda r: r["Private_Clean"] + r["Private_Dirty"]  # noqa: E731
    results.put((own(after) - own(before), after["Pss"] - before["Pss"], images.numel() / 2**20))
    barrier.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a folder of images or an archive of one")
    args = ap.parse_args()
    from diffcli import data as D

    print(D.load(args.source).origin)  # build the cache once, as rank 0 does before the others start
    ctx = mp.get_context("spawn")
    for copy in (False, True):
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=rank, args=(args.source, copy, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        rows = [results.get() for _ in procs]
        for p in procs:
            p.join()
        how = "a private copy in each" if copy else "diffcli's memory map"
        for i, (own, pss, size) in enumerate(rows):
            print(f"{how:24s} process {i}: own {own:7.1f} MiB, Pss {pss:7.1f} MiB (the pixels are {size:.1f} MiB)")


if __name__ == "__main__":
    main()
