"""Device choice: `auto` takes CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import contextlib
import functools

import torch

from diffcli.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU here; use --device auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but Apple MPS is not available here; use --device auto or cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or mps.") from None


@functools.cache  # asked on every training step
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively, where oneDNN's bf16 convolutions beat fp32: on
    AMX tiles (Intel Sapphire Rapids and later) or with AVX512-BF16 dot products (AMD Zen 4 and
    later, Intel Cooper Lake). Everywhere else bf16 is emulated and slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # newer torch: every flag cpuinfo reads
    if capabilities is not None:
        flags = capabilities()
        return bool(flags.get("amx_bf16", False) or flags.get("avx512_bf16", False))
    has_tiles = getattr(torch.cpu, "_is_amx_tile_supported", None)  # older torch: the tile unit only
    return bool(has_tiles is not None and has_tiles())


# The narrowest network (base channels) that trains faster in bf16 on such a CPU: narrow layers
# gain little and still pay the casts. Against fp32 (benchmarks/cpu_precision.py): on the AMX Xeon
# `tiny` (8) 0.46x, the full-resolution `small` (16) 1.23x, `base` (128) 1.85x; on an AVX512-BF16
# AMD EPYC (Zen 5) `tiny` 0.53x, the patched `small` (32) 1.25x, `base` 1.51x.
BF16_MIN_WIDTH = 16


def precision_for(device: torch.device, precision: str = "auto", width: int = BF16_MIN_WIDTH) -> str:
    """"bf16" or "fp32": what `precision` means on `device` for a network `width` base channels
    wide. "auto" is bf16 where the hardware runs it natively (CUDA with bf16, a CPU with native
    bf16 for networks of at least BF16_MIN_WIDTH) and fp32 elsewhere. On the 2-core AMX Xeon
    bf16 trained shapes 1.13-1.15x faster at the same quality per step over 3 seeds, and 10
    minutes of MNIST made 1.15x the steps at 98.7% / 1.73x the FD floor against fp32's 98.1% /
    1.75x; on the AVX512-BF16 EPYC 2 minutes of shapes made 1.09-1.17x the steps at 93.8% /
    1.37 against 92.6% / 1.72 over 2 seeds (docs/results.md)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 was asked for, but this GPU has no bf16; use --precision auto or fp32.")
    if precision != "auto":
        return precision
    native = ((device.type == "cuda" and torch.cuda.is_bf16_supported())
              or (device.type == "cpu" and width >= BF16_MIN_WIDTH and cpu_has_native_bf16()))
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (no loss scaling needed, unlike fp16) where `precision_for` says bf16
    (for "auto": for a network at least BF16_MIN_WIDTH wide; training passes its resolved precision)."""
    if precision_for(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sampling_autocast(device: torch.device):
    """Sampling's precision: bf16 on CUDA, fp32 on every CPU. With AMX, bf16 forward passes of
    `small` were only 1.2x faster (1,357 against 1,135 images/s, batch 64), not worth pictures
    of one seed that differ between CPUs with and without native bf16."""
    return autocast(device, "auto" if device.type == "cuda" else "fp32")


def memory_format(device: torch.device, precision: str = "auto") -> torch.memory_format:
    """channels_last: oneDNN's fp32 convolutions run ~12% faster in it on the CPU, and CUDA's
    tensor cores want it. bf16 on the CPU is the exception: there oneDNN's channels_last
    path was 27% slower than contiguous for `small` (benchmarks/cpu_precision.py)."""
    if device.type == "cpu" and precision_for(device, precision) == "bf16":
        return torch.contiguous_format
    return torch.channels_last


# What `--preset auto` (the default) trains on each kind of device. A laptop CPU gets
# `small`, the network it can train in minutes. On a GPU `small` leaves the chip idle
# (an H200 ran it at 8,808 images/s, 0.5% of its bf16 peak) where `base` keeps it busy
# (4,516 images/s, 17%), so a GPU's minutes buy the DDPM CIFAR-10 network. Whether a size
# between the two makes better pictures per GPU-minute is still to be measured (issue 34).
AUTO_PRESETS = {"cuda": "base"}  # every other device: small


def preset_for(device: torch.device | str) -> str:
    """The preset `auto` means on `device` ("cpu", "cuda:1", a torch.device; no GPU needed to ask)."""
    return AUTO_PRESETS.get(torch.device(device).type, "small")


def fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW for this device: one kernel over all parameters
    instead of about ten small ops per tensor (for the `small` preset on the 2-core CPU
    here, 1.6 ms per step instead of 8.7 ms). CUDA has it; the CPU since torch 2.4."""
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To CUDA through pinned memory without blocking: a plain
    copy from pageable memory waits for the GPU to finish everything queued, a host-device
    sync on every training step (the caching host allocator keeps the pinned block until
    the copy is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), with queued CUDA work finished before the clock stops."""
    import time

    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
