"""Training images/s of diffcli's U-Net against diffusers' UNet2DModel at matched parameters.

All train the same way (ε-MSE on q_sample'd inputs, AdamW, gradient clipping), same batch,
same device, same precision (bf16 autocast on CUDA, fp32 on the CPU unless `--cpu-bf16`), in interleaved rounds
so a noisy machine affects all alike. Each builds its optimizer the way its tool does:
diffcli as `diffcli train` (fused AdamW where torch has it), diffusers as its
train_unconditional.py example (plain `torch.optim.AdamW`, which on the CPU updates one
tensor at a time). Each contender runs in a fresh process: diffcli's keeps freed memory
mapped as the `diffcli` command does (allocator.py), diffusers' is a plain Python process.
A third row, diffusers+fused, gets diffcli's optimizer, process setting and (where diffcli
compiles) torch.compile, so it differs from diffcli's row in the network alone. diffcli
compiles where `diffcli train` does by default (CUDA); `--compile on|off` overrides that. Prints images/s, the ratio diffcli / diffusers,
FLOPs per training image (torch.utils.flop_counter), the fraction of the device's peak
and, on CUDA, peak memory.

    python benchmarks/train_throughput.py --presets small,base --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import diffcli_unet, diffusers_unet, in_fresh_process  # noqa: E402

from diffcli import compiling  # noqa: E402
from diffcli.allocator import keep_freed_memory  # noqa: E402
from diffcli.devices import autocast, describe, fused_adamw, memory_format, pick_device, timed  # noqa: E402
from diffcli.schedules import make_schedule, q_sample  # noqa: E402


def precision(device, cpu_bf16: bool) -> str:
    """The `--precision` both tools train in: bf16 on CUDA; on the CPU fp32 unless `--cpu-bf16`,
    even where `diffcli train`'s auto would take bf16 (AMX, AVX512-BF16), so the CPU tables stay fp32."""
    return "auto" if device.type == "cuda" else "bf16" if cpu_bf16 else "fp32"


def step_fn(model, forward, device, batch, size, channels_last, fused, cpu_bf16=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    schedule = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        y = torch.randint(0, 11, (batch,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        with autocast(device, precision(device, cpu_bf16)):
            out = forward(model, q_sample(schedule, x0, t, noise), t, y)
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def flops_per_image(model, forward, size):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        forward(model, x, torch.tensor([10]), torch.tensor([1])).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()



def contender(name: str, preset: str, cpu_bf16: bool = False):
    """(model, forward, channels_last, fused AdamW) for one contender."""
    ours = lambda m, x, t, y: m(x, t, y)  # noqa: E731
    theirs = lambda m, x, t, y: m(x, t, class_labels=y).sample  # noqa: E731
    cpu_or_cuda = pick_device("auto")
    if name == "diffcli":  # the layout `diffcli train` picks for this device and precision
        layout = memory_format(cpu_or_cuda, precision(cpu_or_cuda, cpu_bf16))
        return diffcli_unet(preset, matched=True), ours, layout == torch.channels_last, fused_adamw(cpu_or_cuda)
    return diffusers_unet(preset), theirs, False, name == "diffusers+fused" and fused_adamw(cpu_or_cuda)


IMPLS = ("diffcli", "diffusers", "diffusers+fused")


# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendor data sheets, by device name.
GPU_BF16_PEAK = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0}


def gpu_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


def worker(name: str, preset: str, batch: int, steps: int, compile_: bool, cpu_bf16: bool) -> tuple[float, ...]:
    """One contender in this process: build, count, warm up, time `steps` steps; (images/s,
    peak MiB on CUDA, parameters, FLOPs per training image), so the parent imports no peer."""
    if name != "diffusers":
        keep_freed_memory()  # what the `diffcli` command does at start-up
    device = pick_device("auto")
    torch.manual_seed(0)
    model, fwd, cl, fused = contender(name, preset, cpu_bf16)
    params, flops = sum(p.numel() for p in model.parameters()), flops_per_image(model, fwd, 32)
    model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format).train()
    compiled = torch.compile(model, dynamic=False) if compile_ and name != "diffusers" else model
    step = step_fn(compiled, fwd, device, batch, 32, cl, fused, cpu_bf16)
    for _ in range(2 if compiled is not model else 1):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate = batch * steps / timed(lambda: [step() for _ in range(steps)], device)[1]
    return rate, (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")), params, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on the CPU (8 for base), 256 on CUDA")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the fraction column "
                    "(default: 0.166 on the CPU, measured 2048^2 fp32 matmul on this project's 2-core machine)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile diffcli and diffusers+fused (auto: as `diffcli train` does, on CUDA only)")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU too, for every contender")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = pick_device("auto")
    compile_ = compiling.wanted({"auto": None, "on": True, "off": False}[args.compile], device)
    if args.worker:
        print(*worker(args.worker, args.presets, args.batch, args.steps, compile_, args.cpu_bf16))
        return
    peak = args.peak_tflops or (0.166 if device.type == "cpu" else gpu_peak(device))
    print(f"device: {describe(device)}, torch {torch.__version__}, compile {'on' if compile_ else 'off'}, "
          f"{'bf16' if args.cpu_bf16 or device.type == 'cuda' else 'fp32'}, "
          f"peak for %peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print(f"{'preset':8} {'impl':15} {'params':>11} {'GFLOP/img':>10} {'img/s':>8} {'%peak':>6} {'peak MB':>8}")
    for preset in args.presets.split(","):
        batch = args.batch or (256 if device.type == "cuda" else (8 if preset == "base" else 64))
        rates, mems, sizes = {name: [] for name in IMPLS}, {}, {}
        for _ in range(args.rounds):  # interleaved: A B C A B C ...
            for name in IMPLS:
                rate, mems[name], *sizes[name] = in_fresh_process(__file__, name, ["--presets", preset, "--batch", str(batch),
                                                                     "--steps", str(args.steps), "--compile", args.compile,
                                                                     *(["--cpu-bf16"] if args.cpu_bf16 else [])])
                rates[name].append(rate)
        med = {name: statistics.median(r) for name, r in rates.items()}
        for name in IMPLS:
            params, flops = int(sizes[name][0]), sizes[name][1]
            frac = f"{100 * med[name] * flops / (peak * 1e12):5.1f}" if peak else "   - "
            mem = f"{mems[name]:8.0f}" if device.type == "cuda" else "       -"
            print(f"{preset:8} {name:15} {params:11,} {flops / 1e9:10.2f} {med[name]:8.1f} {frac:>6} {mem}")
        print(f"{preset:8} ratio diffcli / diffusers: {med['diffcli'] / med['diffusers']:.2f}x; networks alone "
              f"(diffcli / diffusers+fused): {med['diffcli'] / med['diffusers+fused']:.2f}x "
              f"(batch {batch}, median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
