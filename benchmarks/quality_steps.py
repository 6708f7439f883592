"""The quality-per-step curve: class accuracy and classifier-FD of one model against the
network evaluations each image costs, for every training-free sampler, and for students
distilled from it (`diffcli distill`), each at the steps it was made for.

A network evaluation is one image through the U-Net: a guided step costs two (the
conditional and the unconditional pass), heun's corrector one more per step. They are
counted, not computed: a forward hook adds up the rows the network sees, divided by the
images drawn, so what the table says is what the sampler did. Every point samples the
same seeds and is scored by `diffcli eval`'s own `evaluate` against the same real images.

    python benchmarks/quality_steps.py --ckpt runs/mnist/model.safetensors \\
        --classifier mnist-classifier.safetensors --n 50 --out docs/images/quality_steps.png \
        --students runs/mnist-4step/model.safetensors
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffcli.checkpoint import load_model
from diffcli.classifier import load_classifier
from diffcli.devices import describe, pick_device
from diffcli.evaluation import EvalOptions, evaluate, real_images
from diffcli.samplers import HEUN_SIGMA_MAX
from diffcli.objective import of
from diffcli.spec import SamplerSpec

BUDGETS = (1, 2, 4, 8, 16, 32, 50, 100)  # network evaluations per image


def steps_for(sampler: str, budget: int, guided: bool, heun_first_euler: bool) -> int | None:
    """The step count whose cost is nearest `budget` without going over (None: none fits)."""
    per_pass = 2 if guided else 1
    if sampler == "heun":  # 2k - 1 evaluations, 2k - 2 where the first step (sigma > 80) is Euler
        cost = lambda k: per_pass * max(1, 2 * k - (2 if heun_first_euler and k > 1 else 1))  # noqa: E731
    else:
        cost = lambda k: per_pass * k  # noqa: E731
    fitting = [k for k in range(1, budget + 1) if cost(k) <= budget]
    return max(fitting) if fitting else None


class Counter:
    """Rows through the network (a forward hook), so the cost of a point is measured."""

    def __init__(self, model):
        self.rows = 0
        model.register_forward_hook(lambda module, args, out: setattr(self, "rows", self.rows + args[0].shape[0]))


def point(name: str, model, cfg, meta, opts: EvalOptions, real, clf, counter: Counter) -> dict:
    """One row of the table: `evaluate` with `opts`, and the evaluations per image it took."""
    counter.rows = 0
    report, images, _ = evaluate(model, cfg, meta["class_names"], opts, real, clf)
    nfe = counter.rows / len(images)
    steps = opts.spec.resolve(cfg.diffusion.timesteps, model.student).steps
    row = {"sampler": name, "steps": steps, "nfe": round(nfe, 2), "class_accuracy": report["class_accuracy"],
           "classifier_fd": report["classifier_fd"], "floor": report["classifier_fd_real_floor"], "seconds": report["sampling_s"]}
    print(f"{name:9s} {steps:3d} steps  {nfe:6.1f} evals/image  acc {row['class_accuracy']:.3f}  "
          f"cFD {row['classifier_fd']:.3f}  {row['seconds']:.1f} s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--samplers", default="ddim,dpm++,heun")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--n", type=int, default=50, help="images per class at every point")
    p.add_argument("--guidance", type=float, default=None, help="default: the sampling default")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--students", default="", help="comma-separated model files distilled from --ckpt")
    p.add_argument("--out", type=Path, default=None, help="the plot (.png); a .json and .md beside it")
    args = p.parse_args()

    device = pick_device(args.device)
    model, cfg, meta = load_model(args.ckpt, device)
    clf, clf_meta = load_classifier(args.classifier, device)
    real = real_images(cfg.data.name, args.data_root or cfg.data.root, cfg.model.image_size)
    base = SamplerSpec(guidance=args.guidance).resolve(cfg.diffusion.timesteps, model.student, model.trained)
    guided = base.guidance != 1.0 and cfg.model.num_classes > 0
    abar_top = float(of(cfg.diffusion).schedule.alphas_cumprod[-1])  # 0 for a flow model: pure noise
    top_sigma = ((1 - abar_top) / abar_top) ** 0.5 if abar_top else float("inf")  # above HEUN_SIGMA_MAX heun's first step is Euler
    counter = Counter(model)
    rows = []
    for sampler in args.samplers.split(","):
        for budget in map(int, args.budgets.split(",")):
            k = steps_for(sampler, budget, guided, top_sigma > HEUN_SIGMA_MAX)
            if k is None or any(r["sampler"] == sampler and r["steps"] == k for r in rows):
                continue
            spec = replace(base, sampler=sampler, steps=k)
            opts = EvalOptions(args.ckpt, spec, args.n, memorisation=False)
            rows.append(point(sampler, model, cfg, meta, opts, real, clf, counter))
    for path in filter(None, args.students.split(",")):
        student, student_cfg, student_meta = load_model(path, device)
        opts = EvalOptions(Path(path), SamplerSpec(), args.n, memorisation=False)  # the steps it was made for
        rows.append(point("distilled", student, student_cfg, student_meta, opts, real, clf, Counter(student)))
    table = ["| sampler | steps | evaluations / image | class accuracy | classifier-FD | seconds |", "|---|---|---|---|---|---|"]
    table += [f"| {r['sampler']} | {r['steps']} | {r['nfe']:g} | {r['class_accuracy']:.1%} | {r['classifier_fd']:.3f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    floor = rows[0]["floor"] if rows else float("nan")
    print("\n".join(table))
    print(f"real-image floor of classifier-FD: {floor:.3f}; {args.n} images per class; guidance {base.guidance:g}; "
          f"{describe(device)}; {torch.__version__}")
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "floor": floor, "n": args.n,
                                                             "guidance": base.guidance, "device": describe(device)}, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
        plot(rows, floor, args.out)


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        nfe = [r["nfe"] for r in mine]
        acc.plot(nfe, [100 * r["class_accuracy"] for r in mine], "o-", label=sampler)
        fd.plot(nfe, [r["classifier_fd"] for r in mine], "o-", label=sampler)
    fd.axhline(floor, color="grey", linestyle="--", label="real images")
    for ax, name in ((acc, "class accuracy (%)"), (fd, "classifier-FD (lower is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fd.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
