"""uint8 image tensors (N, C, H, W) <-> PIL, grids, labelled strips.

Everything here works on uint8; the [-1, 1] model range is converted in data.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 2  # pixels between grid cells
HEADER = 14  # caption band above a strip or a contact-sheet cell
GAP = 8  # between the x_t half and the x̂0 half of a trajectory


def to_pil(img: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 -> PIL (L for one channel, RGB for three)."""
    arr = img.detach().cpu().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def grid(images: torch.Tensor, ncol: int, pad: int = PAD, fill: int = 255) -> Image.Image:
    """Tile N images row by row, `ncol` per row; size (rows*(H+pad)+pad, ncol*(W+pad)+pad)."""
    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    canvas = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), fill, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    return to_pil(canvas)


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


def save(img: Image.Image, path: str | Path) -> Path:
    """Save by extension (PNG unless told otherwise), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # refuse larger images instead of exhausting memory (e.g. 10000x10000)


def open_image(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 'L' (grayscale) or 'RGB' (everything else).

    Palette and alpha images are flattened onto white; 16-bit grayscale is scaled,
    not clipped; the first frame of an animation is used. Raises ValueError with a
    readable reason when the file is not a usable image.
    """
    from PIL import UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"it is {im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} diffcli reads")
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ValueError("it is not an image PIL can read") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"it could not be decoded ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits instead of clipping at 255.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype("uint8"), mode="L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    return img.convert("L" if img.mode in ("L", "1") else "RGB")


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then resize to size x size (antialiased)."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC if side < size else Image.LANCZOS)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL 'L' or 'RGB' -> (C, H, W) uint8."""
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [ms_per_frame] * (len(frames_out) - 1) + [ms_per_frame * 6]
    frames_out[0].save(path, save_all=True, append_images=frames_out[1:], duration=durations, loop=0)
    return path


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
