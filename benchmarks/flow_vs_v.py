"""Flow matching against v-prediction on the same data and budget: quality per network
evaluation of two models, each scored as `benchmarks/quality_steps.py` scores one (the
evaluations counted by a forward hook, `diffcli eval`'s own `evaluate`, the same seeds and
real images), drawn as one pair of curves per dataset.

The two models are trained with one config but for `diffusion.objective` (ddpm with
v-prediction, or flow), for the same number of steps: a step of either costs the same
(docs/benchmarks.md gives the measured rate), so the same steps are the same CPU-minutes,
and the runs need not be alone on the machine.

    python benchmarks/flow_vs_v.py --name MNIST --v runs/mnist-10/model.safetensors \\
        --flow runs/flow-mnist-10/model.safetensors --classifier runs/mnist-classifier.safetensors \\
        --n 50 --out docs/images/flow_vs_v_mnist.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_steps import Counter, point, steps_for  # noqa: E402

from diffcli.checkpoint import load_model  # noqa: E402
from diffcli.classifier import load_classifier  # noqa: E402
from diffcli.devices import describe, pick_device  # noqa: E402
from diffcli.evaluation import EvalOptions, real_images  # noqa: E402
from diffcli.objective import of  # noqa: E402
from diffcli.samplers import HEUN_SIGMA_MAX  # noqa: E402
from diffcli.spec import SamplerSpec  # noqa: E402

BUDGETS = (8, 16, 32, 64, 100)  # network evaluations per image (a guided step costs two)


def curve(path: Path, label: str, args, device, clf, real) -> list[dict]:
    """Every (sampler, budget) point of one model, at its own default guidance (and --shift)."""
    model, cfg, meta = load_model(path, device)
    base = SamplerSpec(guidance=args.guidance, shift=args.shift).resolve(cfg.diffusion.timesteps, model.student, model.trained)
    guided = base.guidance != 1.0 and cfg.model.num_classes > 0
    abar_top = float(of(cfg.diffusion).schedule.alphas_cumprod[-1])  # 0 for flow: pure noise, σ infinite
    heun_first_euler = abar_top == 0 or (1 - abar_top) / abar_top > HEUN_SIGMA_MAX**2
    counter, rows = Counter(model), []
    extra = [item.split(":") for item in filter(None, args.extra.split(","))]
    for sampler in args.samplers.split(","):
        for budget in [*map(int, args.budgets.split(",")), *(int(b) for name, b in extra if name == sampler)]:
            k = steps_for(sampler, budget, guided, heun_first_euler)
            if k is None or any(r["sampler"] == f"{label} {sampler}" and r["steps"] == k for r in rows):
                continue
            opts = EvalOptions(path, replace(base, sampler=sampler, steps=k), args.n, memorisation=False)
            rows.append({**point(f"{label} {sampler}", model, cfg, meta, opts, real, clf, counter), "model": label,
                         "guidance": base.guidance})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the dataset's name, for the table and the plot")
    p.add_argument("--v", type=Path, required=True, help="the v-prediction (ddpm) model")
    p.add_argument("--flow", type=Path, required=True, help="the flow matching model")
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--samplers", default="euler,dpm++,heun")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--extra", default="", help="more points for some samplers only, as sampler:budget,... (e.g. euler:100)")
    p.add_argument("--n", type=int, default=50, help="images per class at every point")
    p.add_argument("--guidance", type=float, default=None, help="default: each model's sampling default")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="the plot (.png); a .json and .md beside it")
    args = p.parse_args()

    device = pick_device(args.device)
    clf, _ = load_classifier(args.classifier, device)
    _, cfg, _ = load_model(args.v, device)
    real = real_images(cfg.data.name, args.data_root or cfg.data.root, cfg.model.image_size)
    rows = curve(args.v, "v", args, device, clf, real) + curve(args.flow, "flow", args, device, clf, real)
    floor = rows[0]["floor"]
    table = ["| model | sampler | steps | evaluations / image | guidance | class accuracy | classifier-FD (× floor) |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['sampler'].split()[-1]} | {r['steps']} | {r['nfe']:g} | {r['guidance']:g} | "
              f"{r['class_accuracy']:.1%} | {r['classifier_fd']:.3f} ({r['classifier_fd'] / floor:.1f}×) |" for r in rows]
    print("\n".join(table))
    print(f"{args.name}: real-image floor of classifier-FD {floor:.3f}; {args.n} images per class; shift {args.shift:g}; "
          f"{describe(device)}; torch {torch.__version__}")
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "floor": floor, "n": args.n, "shift": args.shift,
                                                             "device": describe(device)}, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
        plot(rows, floor, args.name, args.out)


def plot(rows: list[dict], floor: float, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == label]
        style = "o-" if mine[0]["model"] == "flow" else "s--"
        colour = {"euler": "C0", "dpm++": "C1", "heun": "C2"}.get(label.split()[-1])  # one colour a sampler
        nfe = [r["nfe"] for r in mine]
        acc.plot(nfe, [100 * r["class_accuracy"] for r in mine], style, color=colour, label=label)
        fd.plot(nfe, [r["classifier_fd"] / floor for r in mine], style, color=colour, label=label)
    for ax, what in ((acc, "class accuracy (%)"), (fd, "classifier-FD / real floor (lower is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fd.set_yscale("log")
    fig.suptitle(f"{name}: flow matching (solid) against v-prediction (dashed), same steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
