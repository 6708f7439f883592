"""Sample quality for the same wall-clock budget (MNIST by default, or any `--data`): diffcli's
defaults against the two setups people would otherwise copy.

- diffcli: `diffcli train --data DATA --minutes M` exactly as a user runs it (a subprocess,
  its checkpoints and grids included in the budget), sampled with DDIM 50 steps and its
  default guidance.
- lucidrains' denoising-diffusion-pytorch: its classifier-free-guidance `Unet` +
  `GaussianDiffusion` with their defaults (cosine schedule, ε target, label drop 0.5) in a
  plain loop with its Trainer's recipe (Adam 1e-4, betas (0.9, 0.99), batch 16, grad-norm 1,
  EMA 0.995 every 10 steps), sampled with its default sampler at 50 steps (DDIM, eta 1) and
  its default guidance (cond_scale 6, rescaled_phi 0.7).
- diffusers: `UNet2DModel` (class labels through `num_class_embeds`) + `DDPMScheduler` with
  the recipe of examples/unconditional_image_generation/train_unconditional.py (AdamW 1e-4,
  betas (0.95, 0.999), weight decay 1e-6, 500 warm-up steps then cosine over its default
  100 epochs, batch 16, EMA with warm-up power 3/4 up to 0.9999, linear betas, ε-MSE),
  sampled with its pipeline's DDPMScheduler at 50 steps; it has no guidance.

The peers get diffcli's width (16 × (1, 2, 4) channels; 0.79M and 0.69M parameters against
diffcli's 0.72M): their default widths are made for 64-128 px GPU training. Every model is
scored by the same reference classifier on the same number of images per class, against
the data's test split (a folder's or archive's test/).

    python benchmarks/quality_mnist.py --minutes 10 --data-root data --classifier mnist-classifier.safetensors
    python benchmarks/quality_mnist.py --data cifar10-jpeg.tar.gz --minutes 30 --classifier cifar-classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffcli import data as D
from diffcli.devices import pick_device, timed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import diffusers_unet  # noqa: E402

SAMPLE_STEPS = 50


def batches(data: D.ImageData, batch: int, seed: int):
    """Endless shuffled (uint8 images, labels) batches, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data.labels), generator=g)
        for idx in order[: len(order) // batch * batch].view(-1, batch):
            yield data.images[idx], data.labels[idx]


def train_for(budget_s: float, step) -> int:
    """Call step() until the budget is spent; returns the number of steps."""
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        step()
        steps += 1
    return steps


# --- contenders: each returns (steps, batch, sample(labels, seed) -> uint8 images) --------

def diffcli_contender(args, data, device):
    from diffcli.checkpoint import load_model
    from diffcli.generate import generate
    from diffcli.objective import of
    from diffcli.spec import SamplerSpec

    with tempfile.TemporaryDirectory(prefix="quality-diffcli-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "diffcli", "train", "--data", args.data, "--data-root", str(args.data_root),
               "--minutes", str(args.minutes), "--out", str(out), "--device", str(device)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        model, cfg, meta = load_model(out / "model.safetensors", device)
    objective = of(cfg.diffusion)

    def sample(labels, seed):
        return generate(model, objective, SamplerSpec("ddim", args.sample_steps),  # default guidance
                        labels=labels, seeds=list(range(seed, seed + len(labels))), batch_size=250)

    return meta["step"], cfg.train.batch_size, sample


def lucidrains_contender(args, data, device):
    from denoising_diffusion_pytorch.classifier_free_guidance import (
        GaussianDiffusion,
        Unet,
    )
    from ema_pytorch import EMA

    torch.manual_seed(args.seed)
    _, channels, size, _ = data.images.shape
    unet = Unet(dim=16, num_classes=data.num_classes, dim_mults=(1, 2, 4), channels=channels)
    diffusion = GaussianDiffusion(unet, image_size=size, sampling_timesteps=args.sample_steps).to(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10).to(device)
    batch = 16
    it = batches(data, batch, args.seed)

    def step():
        x, y = next(it)
        loss = diffusion(x.float().div(255).to(device), classes=y.to(device))  # it takes [0, 1] images
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema.update()

    steps = train_for(args.minutes * 60, step)

    @torch.no_grad()
    def sample(labels, seed):
        torch.manual_seed(seed)  # its sampler draws from the global generator
        ema.ema_model.eval()
        out = [ema.ema_model.sample(torch.tensor(chunk, device=device)) for chunk in _chunks(labels, 250)]
        return (torch.cat(out).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    return steps, batch, sample


def diffusers_contender(args, data, device):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    _, channels, size, _ = data.images.shape
    unet = diffusers_unet("small", size, channels, data.num_classes).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    batch = 16
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_cosine_schedule_with_warmup(opt, 500, 100 * (len(data.labels) // batch))
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    it = batches(data, batch, args.seed)
    g = torch.Generator().manual_seed(args.seed)

    def step():
        x, y = next(it)
        x0 = (x.float() / 127.5 - 1).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y.to(device)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())

    steps = train_for(args.minutes * 60, step)
    ema.copy_to(unet.parameters())
    unet.eval()

    @torch.no_grad()
    def sample(labels, seed):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for chunk in _chunks(labels, 250):
            scheduler.set_timesteps(args.sample_steps)
            x = torch.randn((len(chunk), channels, size, size), generator=gen).to(device)
            y = torch.tensor(chunk, device=device)
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, class_labels=y).sample, t, x, generator=gen).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        return torch.cat(out)

    return steps, batch, sample


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


CONTENDERS = {"diffcli": diffcli_contender, "lucidrains": lucidrains_contender, "diffusers": diffusers_contender}


def main() -> None:
    from diffcli.classifier import load_classifier
    from diffcli.evaluation import class_fidelity
    from diffcli.files import save_image as save
    from diffcli.images import grid

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist", help="what `diffcli train --data` takes: a name, folder or archive")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per contender")
    p.add_argument("--data-root", type=Path, default=D.default_root())
    p.add_argument("--classifier", type=Path, required=True, help="from `diffcli classifier train` on the same data")
    p.add_argument("--n", type=int, default=100, help="images per class for the scores")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--pictures", type=Path, default=None, help="folder for a grid per contender: the first 8 scored images of each class")
    args = p.parse_args()

    device = pick_device(args.device)
    data = D.load(args.data, str(args.data_root), limit=args.limit)
    test = D.test_split(args.data, str(args.data_root))
    if test is None:
        raise SystemExit(f"--data {args.data} has no test split (a test/ folder) to score against")
    clf, clf_meta = load_classifier(args.classifier, device)
    floor = data.images[torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1))[:10 * args.n]]
    labels = [k for k in range(10) for _ in range(args.n)]
    print(f"device: {device}, {torch.get_num_threads()} threads; budget {args.minutes:g} min each; "
          f"{len(labels)} images per model; classifier {clf_meta['test_accuracy']:.2%} on the test split", flush=True)
    rows = []
    for name in args.contenders.split(","):
        steps, batch, sample = CONTENDERS[name](args, data, device)
        images, seconds = timed(lambda: sample(labels, args.seed), device)
        scores = class_fidelity(clf, images, torch.tensor(labels), test.images, floor)
        if args.pictures:
            first = torch.cat([images[k * args.n:k * args.n + min(8, args.n)] for k in range(10)])
            save(grid(first, min(8, args.n)), args.pictures / f"{name}.png")
        rows.append({"contender": name, "steps": steps, "batch": batch, "images_seen": steps * batch,
                     "class_accuracy": scores["class_accuracy"], "classifier_fd": scores["classifier_fd"],
                     "real_floor_fd": scores["classifier_fd_real_floor"], "per_class_accuracy": scores["per_class_accuracy"],
                     "samples_per_s": len(labels) / seconds})
        r = rows[-1]
        print(f"{name}: {r['images_seen']:,} images seen, accuracy {r['class_accuracy']:.2%}, "
              f"classifier-FD {r['classifier_fd']:.3f}, {r['samples_per_s']:.1f} samples/s", flush=True)

    print(f"\n| contender | images seen | class accuracy | classifier-FD | samples/s ({args.sample_steps} steps) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} | {r['images_seen']:,} | {r['class_accuracy']:.1%} | {r['classifier_fd']:.3f} | "
              f"{r['samples_per_s']:.1f} |")
    print(f"| real training images | - | - | {rows[0]['real_floor_fd']:.3f} | - |")
    if args.json:
        args.json.write_text(json.dumps({"minutes": args.minutes, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
