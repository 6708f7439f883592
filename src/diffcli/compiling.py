"""torch.compile for the U-Net, with a way back to eager when it cannot compile here.

`torch.compile` fuses the U-Net's elementwise work (GroupNorm, SiLU, the AdaGN
scale-shift, residual adds) into fewer kernels and takes Python off the per-layer path,
which is where a small U-Net on a GPU spends its time. It needs a working backend
(Triton on CUDA, a C++ compiler on the CPU) and compiles for a while before the first
step, so the tool checks it once on the real shapes and says so when it falls back.
"""

from __future__ import annotations

from typing import Callable

import torch

# Inductor generates fused kernels; tests swap in "aot_eager", which traces the same graphs
# (forward and backward) without generating code, in seconds instead of a minute.
BACKEND = "inductor"


def wanted(flag: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile; unset: on for CUDA only. On the 2-core CPU here a compiled
    `small` U-Net was slower than eager after ~40 s of compiling (training 227 against 261
    images/s, sampling 7.0 against 8.1; docs/benchmarks.md): the hand-fused ResBlock leaves
    Inductor little to fuse there, while on a GPU the per-kernel launch cost it removes dominates."""
    return device.type == "cuda" if flag is None else flag


def compiled(module: torch.nn.Module, check: Callable[[Callable], None], report: Callable[..., None],
             device: torch.device) -> Callable:
    """`module` compiled, once `check(fast)` has run a step through it without error; else
    `module` itself, with a notice. `check` runs under a forked RNG (the CPU's and `device`'s)
    so that the try leaves the run's random sequence (dropout draws) as it was."""
    fast = torch.compile(module, backend=BACKEND, dynamic=False)  # shapes are fixed per run
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=gpus):
            check(fast)
    except Exception as e:  # any backend failure: missing compiler or Triton, an unsupported op
        while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
            e = inner  # dynamo wraps the backend's own error; that one says what is missing
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        report("notice", message=f"torch.compile did not work here ({type(e).__name__}: {first_line}); running without it "
                                 f"(pass --no-compile to skip the attempt).")
        return module
    return fast
