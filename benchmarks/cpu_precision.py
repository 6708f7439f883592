"""Training images/s of diffcli's U-Net on the CPU in fp32 and bf16 autocast, channels_last
and contiguous: the evidence for (or against) a CPU precision other than fp32.

On CPUs with AMX (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4 and later)
oneDNN runs bf16 convolutions natively; elsewhere bf16 is emulated and slow. `--precision
auto` trains in bf16 contiguous on the former and fp32 channels_last on the others; this
shows all four settings on the machine at hand.

    python benchmarks/cpu_precision.py --presets small,base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import diffcli_unet  # noqa: E402
from train_throughput import step_fn  # noqa: E402

from diffcli.allocator import keep_freed_memory  # noqa: E402
from diffcli.devices import describe, timed  # noqa: E402

SETTINGS = [("fp32", True), ("fp32", False), ("bf16", True), ("bf16", False)]  # (precision, channels_last)


def rate(preset: str, batch: int, steps: int, bf16: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = diffcli_unet(preset).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    step = step_fn(model, lambda m, x, t, y: m(x, t, y), torch.device("cpu"), batch, 32, channels_last, True, bf16)
    step()  # warm-up
    return batch * steps / timed(lambda: [step() for _ in range(steps)], torch.device("cpu"))[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    keep_freed_memory()  # as the `diffcli` command does
    cpu = torch.device("cpu")
    print(f"device: {describe(cpu)}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    for preset in args.presets.split(","):
        batch = 8 if preset == "base" else 64
        best = {s: 0.0 for s in SETTINGS}
        for _ in range(args.rounds):  # interleaved; the best round of each
            for s in SETTINGS:
                best[s] = max(best[s], rate(preset, batch, args.steps, s[0] == "bf16", s[1]))
        base = best[("fp32", True)]
        for (prec, cl), r in best.items():
            layout = "channels_last" if cl else "contiguous"
            print(f"{preset:6} {prec} {layout:14} {r:8.1f} images/s  {r / base:5.2f}x of fp32 channels_last (batch {batch})")


if __name__ == "__main__":
    main()
