"""Editing on real MNIST test digits, scored with `diffcli eval`'s reference classifier.

    python benchmarks/edit_mnist.py --ckpt runs/mnist/model.safetensors \
        --classifier mnist-classifier.safetensors --data-root ../shared/datasets

- image-to-image: the first N test 3s edited toward 8 at --strength: the share the
  classifier calls 8, and the share of edits closer (RMS) to their own input than to any
  other input (an edit that forgets its input would be as close to the others);
- inpainting: the lower half of the first N test digits redrawn under their true label,
  for each --jumps: the share the classifier gives that label; beside it, the same
  digits with the lower half blanked, to show what the kept half alone tells it.

Pictures of the first 10 of each go to --out-dir. Prints one table; docs/results.md
holds the figures with the device they came from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffcli import data as D
from diffcli import edit as E
from diffcli.checkpoint import load_model
from diffcli.classifier import load_classifier, predict
from diffcli.devices import describe, pick_device
from diffcli.figures import edit_sheet
from diffcli.files import save_image as save
from diffcli.objective import of
from diffcli.spec import SamplerSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jumps", default="1,3,5")
    p.add_argument("--out-dir", type=Path, default=Path("edit_mnist"))
    args = p.parse_args()

    device = pick_device("auto")
    model, cfg, _ = load_model(args.ckpt, device)
    clf, _ = load_classifier(args.classifier, device)
    test = D.load("mnist", args.data_root, split="test")
    spec = SamplerSpec("ddim", args.steps)
    common = (model, of(cfg.diffusion), spec)
    print(f"{args.ckpt} (step {_step(args.ckpt)}), {describe(device)}, ddim {args.steps} steps, default guidance")

    threes = test.images[test.labels == 3][:args.n]
    start = time.perf_counter()
    edited = E.img2img(*common, images=threes, labels=[8] * len(threes), seeds=list(range(len(threes))),
                       strength=args.strength, batch_size=250)
    seconds = time.perf_counter() - start
    as_eight = (predict(clf, edited)[0] == 8).float().mean().item()
    rms = torch.cdist(edited.flatten(1).float() / 255, threes.flatten(1).float() / 255) / threes[0].numel() ** 0.5
    own = rms.diagonal()
    closest_own = (own < rms.masked_fill(torch.eye(len(own), dtype=torch.bool), float("inf")).min(1).values).float().mean()
    print(f"| 3 -> 8, strength {args.strength:g} | classified 8: {as_eight:.1%} | closer to own input than to any other: "
          f"{closest_own.item():.1%} (median RMS own {own.median():.3f}, others {rms.median():.3f}) | {seconds:.0f} s |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save(edit_sheet(threes[:10], edited[:10]), args.out_dir / "three_to_eight.png")

    digits, labels = test.images[:args.n], test.labels[:args.n]
    redraw = torch.zeros(len(digits), 1, 28, 28, dtype=torch.bool)
    redraw[:, :, 14:] = True
    blanked = digits.clone()
    blanked[:, :, 14:] = 0
    print(f"| lower half blanked (no model) | true label: {(predict(clf, blanked)[0] == labels).float().mean():.1%} |")
    for jumps in (int(j) for j in args.jumps.split(",")):
        start = time.perf_counter()
        filled = E.inpaint(*common, images=digits, redraw=redraw, labels=labels.tolist(), seeds=list(range(len(digits))),
                           jumps=jumps, batch_size=250)
        seconds = time.perf_counter() - start
        accuracy = (predict(clf, filled)[0] == labels).float().mean().item()
        print(f"| lower half inpainted, jumps {jumps} | true label: {accuracy:.1%} | {seconds:.0f} s |")
        save(edit_sheet(digits[:10], filled[:10], redraw[:10]), args.out_dir / f"inpaint_jumps{jumps}.png")


def _step(path: Path) -> int:
    from diffcli.checkpoint import model_metadata, read_header

    return model_metadata(read_header(path))["step"]


if __name__ == "__main__":
    main()
