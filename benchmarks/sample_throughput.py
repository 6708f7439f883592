"""Sampling images/s: diffcli's DDIM against a diffusers DDIMScheduler loop (the loop of
its DDIMPipeline, with class labels and guidance) on U-Nets of matched parameters, and
the wall time of `diffcli sample` as a whole process.

Each contender runs in a fresh process, rounds interleaved, because one of diffcli's
speed-ups is process-wide: the `diffcli` command keeps freed activation memory mapped
(allocator.py). A third contender, diffusers' loop in a process set up the same way,
separates that from the network and sampler. With `--compile`, a fourth row samples
with the U-Net under torch.compile, as `diffcli sample --compile` does.

    python benchmarks/sample_throughput.py --preset small --n 64 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import diffcli_unet, diffusers_unet, in_fresh_process  # noqa: E402

from diffcli.devices import describe, pick_device, sampling_autocast, timed  # noqa: E402
from diffcli.generate import generate  # noqa: E402
from diffcli.objective import Objective  # noqa: E402
from diffcli.schedules import make_schedule  # noqa: E402
from diffcli.spec import SamplerSpec  # noqa: E402


@torch.no_grad()
def diffusers_ddim(unet, n, steps, guidance, device):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                          clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    null = torch.full_like(y, 10)
    for t in sched.timesteps:
        tt = torch.full((2 * n,), int(t), device=device)
        with sampling_autocast(device):
            out = unet(torch.cat([x, x]), tt, class_labels=torch.cat([y, null])).sample.float()
        cond, uncond = out.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x



IMPLS = ("diffcli", "diffusers", "diffusers+allocator")
COMPILED = "diffcli+compile"


def worker(name: str, args) -> float:
    """One contender in this process: build, warm up, time one batch; returns images/s."""
    from diffcli.allocator import keep_freed_memory

    if name != "diffusers":
        keep_freed_memory()  # what the `diffcli` command does at start-up
    device = pick_device("auto")
    n = args.n or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    if name.startswith("diffcli"):
        model = diffcli_unet(args.preset, matched=True).to(device, memory_format=torch.channels_last).eval()
        if name == COMPILED:
            model = torch.compile(model, dynamic=False)
        labels, seeds = [i % 10 for i in range(n)], list(range(n))
        spec = SamplerSpec("ddim", args.steps, args.guidance)
        run = lambda: generate(model, Objective.ddpm(make_schedule("cosine", 1000), "eps"), spec, labels=labels, seeds=seeds,  # noqa: E731
                               batch_size=n)
    else:
        unet = diffusers_unet(args.preset).to(device).eval()
        run = lambda: diffusers_ddim(unet, n, args.steps, args.guidance, device)  # noqa: E731
    run()  # warm-up
    return n / timed(run, device)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", type=int, default=None, help="batch: 64 on the CPU, 256 on CUDA")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--compile", action="store_true", help=f"add a {COMPILED} row (the warm-up pass compiles)")
    ap.add_argument("--worker", choices=(*IMPLS, COMPILED), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(worker(args.worker, args))
        return
    device = pick_device("auto")
    n = args.n or (256 if device.type == "cuda" else 64)
    impls = (*IMPLS, COMPILED) if args.compile else IMPLS
    rates = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name in impls:
            rates[name] += in_fresh_process(__file__, name, sys.argv[1:])
    print(f"device: {describe(device)}, torch {torch.__version__}; DDIM {args.steps} steps, guidance {args.guidance}, batch {n}")
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name in impls:
        print(f"{args.preset:6} {name:20} {med[name]:8.1f} images/s")
    print(f"ratio diffcli / diffusers: {med['diffcli'] / med['diffusers']:.2f}x; with the same allocator setting "
          f"(diffcli / diffusers+allocator): {med['diffcli'] / med['diffusers+allocator']:.2f}x (median of {args.rounds} rounds)")

    with tempfile.TemporaryDirectory() as tmp:  # the whole process, start-up included
        from diffcli.checkpoint import save_model
        from diffcli.config import preset_config, to_dict

        cfg = preset_config(args.preset)
        cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = 32, 3, 10
        ckpt = Path(tmp) / "model.safetensors"
        save_model(ckpt, diffcli_unet(args.preset).state_dict(), to_dict(cfg), [str(i) for i in range(10)], 0, 0.0)
        exe = [sys.executable, "-m", "diffcli"]
        for cmd in (["--help"], ["inspect", str(ckpt)],
                    ["sample", "--ckpt", str(ckpt), "--label", "all", "--n", str(max(1, n // 10)), "--steps", str(args.steps),
                     "--out", str(Path(tmp) / "s.png")]):
            _, seconds = timed(lambda: subprocess.run(exe + cmd, capture_output=True, check=True), torch.device("cpu"))
            print(f"whole process: diffcli {' '.join(cmd[:1])}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
