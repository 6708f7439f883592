"""The built-in `shapes` dataset: 10 classes of coloured outlines, drawn on the fly, so the
tool has data that needs no download (the README demo, the tests).

A leaf module: torch and PIL only; data.py wraps the result as an `ImageData`.
"""

from __future__ import annotations

import functools
import math

import torch

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "heart", "crescent", "half-disc", "arrow")
SHAPES_PER_CLASS = 3000  # 30k images: enough variety for minutes of training, ~5 s to build
SHAPES_TEST_PER_CLASS = 500  # the held-out split: 5k images, enough for per-class accuracy and feature statistics
# Where and how the outlines are drawn (draw; benchmarks/shape_fit.py searches the same ranges):
RADIUS_MIN, RADIUS_SPAN = 0.30, 0.12  # radius 30-42% of the image size
MAX_TILT = 10  # degrees either side of upright (why: the comment in draw)
CENTRE_SPREAD = 0.9  # the share of the room the radius leaves that the centre wanders over


def polygons(kind: str) -> list[list[tuple[float, float]]]:
    """Outlines in unit coordinates (radius ~1, centred at 0). The first polygon is
    filled, later ones are cut out (for the ring and the crescent)."""
    def regular(n, r=1.0, phase=0.0):
        return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "circle":
        return [regular(64)]
    if kind == "square":
        return [regular(4, 1.0, math.pi / 4)]
    if kind == "triangle":
        return [[(x, y + 0.15) for x, y in regular(3, 1.1, -math.pi / 2)]]
    if kind == "ring":
        return [regular(64), regular(64, 0.55)]
    if kind == "cross":
        a = 0.3
        return [[(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]]
    if kind == "star":
        return [[p for k in range(5) for p in (regular(10, 1.0, -math.pi / 2)[2 * k], regular(10, 0.42, -math.pi / 2)[2 * k + 1])]]
    if kind == "heart":
        pts = []
        for k in range(64):
            s = 2 * math.pi * k / 64
            x = 16 * math.sin(s) ** 3
            y = 13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s) - math.cos(4 * s)
            pts.append((x / 17, -(y + 3) / 17))
        return [pts]
    if kind == "crescent":
        return [regular(64), [(x + 0.45, y - 0.2) for x, y in regular(64, 0.85)]]
    if kind == "half-disc":
        return [[(math.cos(math.pi * k / 32), -math.sin(math.pi * k / 32) + 0.4) for k in range(33)]]
    if kind == "arrow":
        return [[(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]]
    raise ValueError(kind)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return rgb @ torch.tensor([0.299, 0.587, 0.114])


def draw(size: int = 32, per_class: int = SHAPES_PER_CLASS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of coloured shapes with random position, size, rotation and colours on
    backgrounds of varied colour with a gentle gradient. Deterministic from `seed`; shapes are drawn at 4x
    and box-filtered down, so edges are antialiased. Copies of the last two sets drawn are
    kept: `eval` and a process that trains and then evaluates load the same 30,000 images
    more than once, and drawing them takes seconds."""
    images, labels = _drawn(size, per_class, seed)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=2)  # the train and the test split
def _drawn(size: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    n = per_class * len(SHAPES)
    labels = torch.arange(n) % len(SHAPES)
    ss = 4 * size  # supersampling
    outlines = [polygons(k) for k in SHAPES]

    # Nuisance variation is kept moderate (rotation within ±10° of upright, radius 30-42% of
    # the image, the shape kept whole inside it, a gentle gradient) so a few CPU minutes go
    # into learning the outlines: with full 360° rotation a 3-minute run still drew blobs,
    # and with ±30° it drew crosses and stars as splats until about 12 minutes, where ±10°
    # draws every class after the same 3,000 steps (docs/results.md).
    radius = (RADIUS_MIN + RADIUS_SPAN * torch.rand(n, generator=g)) * size
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(2 * MAX_TILT)
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * CENTRE_SPREAD * (size - 2 * radius)
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * CENTRE_SPREAD * (size - 2 * radius)

    # Background: a random colour with a gentle gradient (±0.15) along a random direction.
    # Foreground: a colour whose brightness differs from the background's by at least 0.35.
    base = torch.rand(n, 3, generator=g) * 0.7 + 0.15
    tilt = (torch.rand(n, 3, generator=g) - 0.5) * 0.3
    bg = torch.stack([base - tilt, base + tilt], dim=1).clamp(0, 1)
    fg = torch.rand(n, 3, generator=g)
    for _ in range(100):
        bad = (_luma(fg) - _luma(bg).mean(1)).abs() < 0.35
        if not bad.any():
            break
        fg[bad] = torch.rand(int(bad.sum()), 3, generator=g)
    direction = torch.rand(n, generator=g) * 2 * math.pi

    buf = bytearray()
    for label, r, a, x0, y0 in zip(labels.tolist(), (4 * radius).tolist(), angle.tolist(), (4 * cx).tolist(), (4 * cy).tolist()):
        canvas = Image.new("L", (ss, ss), 0)
        draw = ImageDraw.Draw(canvas)
        c, s = math.cos(a), math.sin(a)
        for j, poly in enumerate(outlines[label]):
            draw.polygon([(x0 + r * (c * x - s * y), y0 + r * (s * x + c * y)) for x, y in poly], fill=255 if j == 0 else 0)
        buf += canvas.resize((size, size), Image.BOX).tobytes()
    masks = torch.frombuffer(buf, dtype=torch.uint8).view(n, 1, size, size).float() / 255

    coords = (torch.arange(size) + 0.5) / size - 0.5
    u = torch.cos(direction)[:, None, None] * coords[None, None, :] + torch.sin(direction)[:, None, None] * coords[None, :, None]
    u = (u / 1.42 + 0.5).clamp(0, 1)[:, None]  # (n, 1, H, W) in [0, 1]
    background = bg[:, 0, :, None, None] * (1 - u) + bg[:, 1, :, None, None] * u
    images = background * (1 - masks) + fg[:, :, None, None] * masks
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return images, labels
