"""Seconds for `diffcli sample --label all --n N` from a teacher (its default sampling:
DDIM, 50 steps, guidance 2, so 100 network evaluations per image) and from its distilled
student (its own few steps, one pass each), as whole processes a user would run, in the
same session, alternating so both see the same machine.

    python benchmarks/distill_speed.py --teacher runs/mnist/model.safetensors \\
        --student runs/mnist-4step/model.safetensors --n 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def seconds(ckpt: Path, n: int, device: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffcli", "sample", "--ckpt", str(ckpt), "--label", "all", "--n", str(n),
                    "--out", str(out), "--device", device], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--n", type=int, default=100, help="images per label")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    times: dict[str, list[float]] = {"teacher": [], "student": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in times:
                times[name].append(seconds(getattr(args, name), args.n, args.device, Path(tmp) / f"{name}.png"))
    median = {name: statistics.median(t) for name, t in times.items()}
    import torch

    from diffcli.devices import describe, pick_device

    print("| model | seconds (median of %d) |" % args.rounds)
    print("|---|---|")
    for name in times:
        print(f"| {name} | {median[name]:.1f} |")
    print(f"ratio teacher / student: {median['teacher'] / median['student']:.1f}x "
          f"(whole process: diffcli sample --label all --n {args.n}; {describe(pick_device(args.device))}; {torch.__version__})")


if __name__ == "__main__":
    main()
