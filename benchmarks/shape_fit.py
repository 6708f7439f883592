"""Does each sample have its class's outline? The README demo's bar is that every row reads as
its shape by eye, and the shapes classifier is more lenient than an eye: it takes a
four-armed splat for a cross. This measures the outline instead.

An image of the `shapes` set is, up to antialiasing and rounding, a planar background
gradient plus a flat colour inside the outline (shapes.py). So each image is fitted, per
channel, by least squares with a plane and the best of its class's outlines drawn at every
size, rotation and position the set draws them (a grid: half-pixel steps, 5 degrees). The
score is how much that outline overlaps the shape the image actually draws (intersection
over union): real test images score 0.92-0.98, a four-armed splat 0.6-0.75.

    python benchmarks/shape_fit.py --models runs/demo/model.safetensors [--n 50] [--guidance G]
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

from diffcli import data as D
from diffcli.shapes import CENTRE_SPREAD, MAX_TILT, RADIUS_MIN, RADIUS_SPAN, SHAPES, polygons

ANGLES = torch.arange(-MAX_TILT, MAX_TILT + 1, 5)  # the set's rotations, every 5°
RADII = torch.linspace(RADIUS_MIN, RADIUS_MIN + RADIUS_SPAN, 6)  # its radii, as a share of the image size


def _outline(kind: str, size: int, radius: float, angle: float, cx: float, cy: float) -> torch.Tensor:
    """The outline's coverage in [0, 1] (size, size), drawn as shapes.draw draws it (4x, box-filtered)."""
    from PIL import Image, ImageDraw

    ss, c, s = 4 * size, math.cos(angle), math.sin(angle)
    canvas = Image.new("L", (ss, ss), 0)
    pen = ImageDraw.Draw(canvas)
    for j, poly in enumerate(polygons(kind)):
        pen.polygon([(4 * cx + 4 * radius * (c * x - s * y), 4 * cy + 4 * radius * (s * x + c * y)) for x, y in poly],
                    fill=255 if j == 0 else 0)
    small = canvas.resize((size, size), Image.BOX)
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(size, size).float() / 255


def _shift(m: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    out = torch.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


@functools.lru_cache(maxsize=1)
def _plane(size: int) -> torch.Tensor:
    """An orthonormal basis (size², 3) of the planar images: a constant and two ramps."""
    ramp = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    basis = torch.stack([torch.ones(size, size), ramp[None].expand(size, size),
                         ramp[:, None].expand(size, size)]).reshape(3, -1).T
    return torch.linalg.qr(basis)[0]


def _off_plane(x: torch.Tensor) -> torch.Tensor:
    """x (..., size²) with its planar part removed."""
    q = _plane(math.isqrt(x.shape[-1]))
    return x - (x @ q) @ q.T


@functools.lru_cache(maxsize=1)
def templates(kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every outline of one class the set can draw, on the grid above: (T, size²) coverage in
    [0, 1], the same off-plane and scaled to unit length, and the scale (T,) that took.
    Each is drawn centred at a whole and a half pixel, then shifted (~27k a class at 32 px)."""
    out = []
    for share in RADII.tolist():
        r = share * size
        reach = CENTRE_SPREAD / 2 * (size - 2 * r) + 0.5  # shapes.draw's centres, plus the half-pixel grid
        for angle in ANGLES.tolist():
            for px in (0.0, 0.5):
                for py in (0.0, 0.5):
                    m = _outline(kind, size, r, math.radians(angle), size / 2 + px, size / 2 + py)
                    for dx in range(-math.floor(reach), math.floor(reach) + 1):
                        for dy in range(-math.floor(reach), math.floor(reach) + 1):
                            out.append(_shift(m, dx, dy))
    coverage = torch.stack(out).reshape(len(out), -1)
    t = _off_plane(coverage)
    norm = t.norm(dim=1)
    return coverage, t / norm[:, None], norm


def fit(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (n, C, H, W), uint8, the best outline of its own class: the partial R²
    of the fit, and the overlap (intersection over union) of that outline with the image's
    own foreground. The foreground is where the image, less the fitted plane, lies more than
    half-way from the background colour to the fitted shape colour: grain that does not
    change a silhouette does not change it, so the overlap judges the outline alone."""
    n, c, h, w = images.shape
    x = images.float().reshape(n, c, h * w) / 255
    off = _off_plane(x)
    total = off.pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
    r2, iou = torch.empty(n), torch.empty(n)
    for k in labels.unique().tolist():
        coverage, unit, norm = templates(SHAPES[k], h)
        for chunk in (labels == k).nonzero().flatten().split(64):
            along = off[chunk] @ unit.T  # (chunk, C, T): each channel's least-squares coefficient on each unit outline
            explained, best = along.pow(2).sum(dim=1).max(dim=1)  # per-channel least squares, summed over channels
            r2[chunk] = explained / total[chunk]
            m = coverage[best]  # (chunk, H*W)
            contrast = along.gather(2, best[:, None, None].expand(-1, c, 1)) / norm[best][:, None, None]  # (chunk, C, 1)
            shape_part = contrast * m[:, None]
            rest = x[chunk] - shape_part
            background = rest - _off_plane(rest)  # the fitted plane
            level = ((x[chunk] - background) * contrast).sum(dim=1) / contrast.pow(2).sum(dim=1).clamp_min(1e-12)
            drawn, outline = level > 0.5, m > 0.5  # level: 0 on the background, 1 in the shape colour
            iou[chunk] = (drawn & outline).sum(dim=1) / (drawn | outline).sum(dim=1).clamp_min(1)
    return r2, iou


def main() -> None:
    from diffcli.checkpoint import load_model
    from diffcli.generate import generate
    from diffcli.objective import of
    from diffcli.spec import SamplerSpec, default_guidance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="model.safetensors files of shapes models, comma-separated")
    p.add_argument("--n", type=int, default=50, help="images per class")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's own (spec.default_guidance)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = p.parse_args()

    real = D.load("shapes", None, split="test", limit=args.n * len(SHAPES))
    labels = torch.arange(args.n * len(SHAPES)) % len(SHAPES)
    sets, names = [real.images], []
    for path in args.models.split(","):
        model, cfg, _ = load_model(path, torch.device("cpu"))
        guidance = args.guidance if args.guidance is not None else default_guidance(model.trained)
        sets.append(generate(model, of(cfg.diffusion), SamplerSpec(steps=args.steps, guidance=guidance), labels=labels.tolist(),
                             seeds=list(range(len(labels)))))
        names.append(f"{path} (guidance {guidance:g})")
    overlap = fit(torch.cat(sets), torch.cat([real.labels] + [labels] * (len(sets) - 1)))[1].split(len(labels))
    print("mean overlap of each image's drawn shape with its class's nearest outline (1: the same pixels)\n")
    print("| images | " + " | ".join(SHAPES) + " | all |")
    print("|---" * (len(SHAPES) + 2) + "|")
    for name, o, lab in zip(["real test images"] + names, overlap, [real.labels] + [labels] * len(names)):
        print(f"| {name} | " + " | ".join(f"{o[lab == k].mean():.2f}" for k in range(len(SHAPES))) + f" | {o.mean():.2f} |")


if __name__ == "__main__":
    main()
