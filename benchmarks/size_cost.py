"""What 64x64 costs: training and sampling time per image of diffcli's presets at 32 and 64 px.

Each preset is built as `diffcli train` builds it (`--image-size 64` changes nothing but the
input: the presets name levels, not pixel sizes, so at 64 every level works on twice the
side, and attention at a level sees four times the tokens). Timed as `train` runs on this
device: bf16 autocast where `--precision auto` takes it, its memory layout, fused AdamW;
sampling as `sample` runs (fp32 on a CPU), one network pass per image per step on a guided
batch of 2B, without gradients.
Sizes are interleaved round by round, so a noisy machine affects both alike.

    python benchmarks/size_cost.py --presets small,base --sizes 32,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import flops_per_image, step_fn  # noqa: E402

from diffcli.config import preset_config  # noqa: E402
from diffcli.devices import describe, fused_adamw, memory_format, pick_device, precision_for, sampling_autocast, timed  # noqa: E402
from diffcli.unet import UNet  # noqa: E402


def build(preset: str, size: int) -> UNet:
    cfg = preset_config(preset).model
    cfg.image_size, cfg.in_channels, cfg.num_classes = size, 3, 10
    torch.manual_seed(0)
    return UNet(cfg)


def attention_tokens(preset: str, size: int) -> str:
    """Tokens per image at each attention level, and in the middle block (unet.py)."""
    m = preset_config(preset).model
    side = size // m.patch_size
    levels = [f"{(side >> lv) ** 2}" for lv in m.attn_levels]
    return "+".join(levels + [f"{(side >> (len(m.channel_mult) - 1)) ** 2}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--batch", type=int, default=16, help="training and sampling batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (and sampling passes) per round")
    args = ap.parse_args()
    device = pick_device("auto")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device: {describe(device)}, torch {torch.__version__}, batch {args.batch}")
    print(f"{'preset':7} {'size':>4} {'params':>11} {'GFLOP/img':>10} {'attn tokens':>12} {'train ms/img':>13} "
          f"{'sample s/img (50 guided)':>25}")
    for preset in args.presets.split(","):
        precision = precision_for(device, "auto", preset_config(preset).model.base_channels)
        cl = memory_format(device, precision) == torch.channels_last
        train, sample = {s: [] for s in sizes}, {s: [] for s in sizes}
        nets = {s: build(preset, s).to(device, memory_format=torch.channels_last if cl else torch.contiguous_format) for s in sizes}
        steps = {s: step_fn(nets[s].train(), lambda m, x, t, y: m(x, t, y), device, args.batch, s, cl, fused_adamw(device),
                            cpu_bf16=precision == "bf16") for s in sizes}
        for s in sizes:
            steps[s]()  # warm-up
        for _ in range(args.rounds):
            for s in sizes:
                train[s].append(timed(lambda: [steps[s]() for _ in range(args.steps)], device)[1] / (args.steps * args.batch))
                x = torch.randn(2 * args.batch, 3, s, s, device=device)
                t, y = torch.full((2 * args.batch,), 500, device=device), torch.zeros(2 * args.batch, dtype=torch.long, device=device)

                def passes():
                    with torch.no_grad(), sampling_autocast(device):
                        for _ in range(args.steps):
                            nets[s].eval()(x, t, y)
                    nets[s].train()

                sample[s].append(timed(passes, device)[1] / (args.steps * args.batch) * 50)  # 50 steps, each 2B: one per image
        for s in sizes:
            net = nets[s].float()
            params = sum(p.numel() for p in net.parameters())
            print(f"{preset:7} {s:>4} {params:11,} {flops_per_image(net.cpu(), lambda m, x, t, y: m(x, t, y), s) / 1e9:10.2f} "
                  f"{attention_tokens(preset, s):>12} {1e3 * statistics.median(train[s]):13.1f} {statistics.median(sample[s]):25.2f}")
        if len(sizes) == 2:
            a, b = sizes
            print(f"{preset:7} ({precision}) {b}/{a}: training {statistics.median(train[b]) / statistics.median(train[a]):.2f}x, "
                  f"sampling {statistics.median(sample[b]) / statistics.median(sample[a]):.2f}x per image")


if __name__ == "__main__":
    main()
