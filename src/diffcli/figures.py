"""Picture composition: captions, strips, contact sheets, trajectories, memorisation pairs.

Everything takes uint8 image tensors (N, C, H, W) or PIL images and returns a PIL image
(or writes a GIF); nothing here samples or decides what to sample.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffcli.files import save_image
from diffcli.images import PAD, grid, to_pil

HEADER = 14  # caption band above a strip or a contact-sheet cell
GAP = 8  # between the x_t half and the x̂0 half of a trajectory
CAPTION_PX = 48  # width a cell needs for its caption to stay legible


def enlargement(images: torch.Tensor) -> int:
    """The whole-number factor that makes small images at least CAPTION_PX wide in figures."""
    return max(1, -(-CAPTION_PX // images.shape[-1]))


def enlarged(img: Image.Image, scale: int) -> Image.Image:
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def caption_below(img: Image.Image, text: str) -> Image.Image:
    """Add a white band under `img` holding `text` (one line of 12 px per line of text)."""
    font = _font(10)
    lines = text.split("\n")
    band = 12 * len(lines) + 2
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, img.height + 1 + 12 * i), line, fill="black", font=font)
    return out


def hstack(images: list[Image.Image], pad: int = PAD) -> Image.Image:
    h = max(i.height for i in images)
    out = Image.new("RGB", (sum(i.width for i in images) + pad * (len(images) + 1), h + 2 * pad), "white")
    x = pad
    for i in images:
        out.paste(i.convert("RGB"), (x, pad))
        x += i.width + pad
    return out


def vstack(images: list[Image.Image], pad: int = 0) -> Image.Image:
    w = max(i.width for i in images)
    out = Image.new("RGB", (w, sum(i.height for i in images) + pad * (len(images) - 1)), "white")
    y = 0
    for i in images:
        out.paste(i.convert("RGB"), (0, y))
        y += i.height + pad
    return out


def contact_sheet(cells: list[list[tuple[Image.Image | None, str]]]) -> Image.Image:
    """A table of captioned pictures: cells[row][col] = (image or None for blank, caption).
    Every column is as wide as its widest picture, every row as tall as its tallest."""
    widths = [max((img.width for row in cells for img, _ in [row[c]] if img), default=60) for c in range(len(cells[0]))]
    heights = [max((img.height for img, _ in row if img), default=20) for row in cells]
    sheet = Image.new("RGB", (sum(widths) + PAD * (len(widths) + 1), sum(h + HEADER for h in heights) + PAD * (len(heights) + 1)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(10)
    y = PAD
    for row, h in zip(cells, heights):
        x = PAD
        for (img, caption), w in zip(row, widths):
            draw.text((x + 1, y + 1), caption, fill="black", font=font)
            if img is not None:
                sheet.paste(img.convert("RGB"), (x, y + HEADER))
            x += w + PAD
        y += h + HEADER + PAD
    return sheet
def trajectory_strip(xt: torch.Tensor, x0: torch.Tensor, timesteps: list[int], final: torch.Tensor,
                     scale: int = 1) -> Image.Image:
    """One row per image: x_t at each kept step then the final sample, a gap, then the
    predicted x̂0 at the same steps. A header band names each column's t.

    Its size is `trajectory_size(F, N, H·scale, W·scale)`.
    """
    frames, n, c, h, w = xt.shape
    cell = w * scale + PAD
    left = [*(xt[f] for f in range(frames)), final]
    right = [x0[f] for f in range(frames)]
    canvas = Image.new("RGB", trajectory_size(frames, n, h * scale, w * scale), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    for col, t in enumerate(timesteps):
        draw.text((PAD + col * cell, 1), f"t={t}", fill="black", font=font)
        draw.text((PAD + (frames + 1) * cell + GAP + col * cell, 1), f"x0 @ {t}", fill="black", font=font)
    draw.text((PAD + frames * cell, 1), "final", fill="black", font=font)
    for r in range(n):
        y = HEADER + PAD + r * (h * scale + PAD)
        for col, frame in enumerate(left):
            canvas.paste(to_pil(frame[r]).resize((w * scale, h * scale), Image.NEAREST), (PAD + col * cell, y))
        for col, frame in enumerate(right):
            canvas.paste(to_pil(frame[r]).resize((w * scale, h * scale), Image.NEAREST),
                         (PAD + (frames + 1) * cell + GAP + col * cell, y))
    return canvas


def trajectory_size(frames: int, n: int, h: int, w: int) -> tuple[int, int]:
    """(width, height) of `trajectory_strip` for F kept steps and N images of h x w."""
    width = PAD + (frames + 1) * (w + PAD) + GAP + frames * (w + PAD)
    return width, HEADER + PAD + n * (h + PAD)


def trajectory_gif(xt: torch.Tensor, x0: torch.Tensor, final: torch.Tensor, path: str | Path,
                   scale: int = 2, ms_per_frame: int = 250) -> Path:
    """An animation: each frame shows every image's x_t (left) and x̂0 (right) at one kept
    step; the last frame, held longer, shows the final samples on both sides."""
    frames_out = []
    for f in range(xt.shape[0] + 1):
        a = xt[f] if f < xt.shape[0] else final
        b = x0[f] if f < xt.shape[0] else final
        pair = torch.cat([a, b], dim=3)  # side by side per image
        g = grid(pair, 1 if pair.shape[0] <= 4 else 2)
        frames_out.append(g.resize((g.width * scale, g.height * scale), Image.NEAREST))
    durations = [ms_per_frame] * (len(frames_out) - 1) + [ms_per_frame * 6]
    return save_image(frames_out[0], path, save_all=True, append_images=frames_out[1:], duration=durations, loop=0)


def sweep_sheet(rows: list[list[tuple[torch.Tensor, float] | None]], titles: list[list[str]],
                blank: list[str]) -> Image.Image:
    """The `compare` contact sheet: one grid of images per cell (None for a cell left empty,
    captioned with `blank[row]`), each captioned with its title and seconds."""
    cells = []
    for row, row_titles, empty in zip(rows, titles, blank):
        line = []
        for cell, title in zip(row, row_titles):
            if cell is None:
                line.append((None, empty))
                continue
            imgs, seconds = cell
            line.append((enlarged(grid(imgs, len(imgs)), enlargement(imgs)), f"{title}: {seconds:.1f} s"))
        cells.append(line)
    return contact_sheet(cells)


def pairs_sheet(images: torch.Tensor, train_images: torch.Tensor, nearest: torch.Tensor, distances: torch.Tensor,
                k: int = 16, per_row: int = 4) -> Image.Image:
    """The k samples closest to a training image, each (left) beside that image (right),
    closest first, captioned with their RMS distance."""
    scale = enlargement(images)
    cells = [(hstack([enlarged(to_pil(images[i]), scale), enlarged(to_pil(train_images[nearest[i]]), scale)]),
              f"d = {float(distances[i]):.3f}") for i in distances.argsort()[:k].tolist()]
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    rows[-1] += [(None, "")] * (per_row - len(rows[-1]))
    return contact_sheet(rows)


def edit_sheet(inputs: torch.Tensor, results: torch.Tensor, masks: torch.Tensor | None = None) -> Image.Image:
    """One row per input: the input, its mask (white = redrawn) if any, then its results
    (len(results) / len(inputs) of them, in order)."""
    n = len(results) // len(inputs)
    rows = []
    for k, img in enumerate(inputs):
        cells = [img[None]]
        if masks is not None:
            cells.append((masks[k:k + 1].to(torch.uint8) * 255).expand(1, img.shape[0], -1, -1))
        rows += [*cells, results[k * n:(k + 1) * n]]
    cells = torch.cat(rows)
    return grid(cells, len(cells) // len(inputs))


def animation(frames: torch.Tensor, path: str | Path, scale: int = 4, ms_per_frame: int = 120) -> Path:
    """A looping GIF of the frames, enlarged `scale` times, going there and back."""
    pictures = [enlarged(to_pil(f), scale) for f in frames]
    loop = pictures + pictures[-2:0:-1]
    return save_image(loop[0], path, save_all=True, append_images=loop[1:], duration=ms_per_frame, loop=0)
