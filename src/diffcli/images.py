"""uint8 image tensors (N, C, H, W) <-> PIL: reading any image file, and plain grids
(files.save_image writes them).

Everything here works on uint8; the [-1, 1] model range is converted in data.py, and
pictures with captions are composed in figures.py. A leaf module: it imports nothing
of diffcli.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

PAD = 2  # pixels between grid cells


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


MAX_PIXELS = 64_000_000  # refuse larger images instead of exhausting memory (e.g. 10000x10000)


def open_image(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 'L' (grayscale) or 'RGB' (everything else).

    Palette and alpha images are flattened onto white; 16-bit grayscale is scaled,
    not clipped, and float grayscale in 0..1 is stretched to 0..255; the first frame of
    an animation is used. Raises ValueError with a readable reason when the file is not a
    usable image.
    """
    from PIL import UnidentifiedImageError

    # PIL's own guard would warn above its limit and refuse past twice it, as an unreadable
    # file; diffcli checks the size itself below, from the header, before decoding anything.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"it has too many pixels ({im.width}x{im.height}, more than the {MAX_PIXELS:,} diffcli reads)")
            im.load()
            img = im.copy()
    except UnidentifiedImageError:
        raise ValueError("it is not an image PIL can read") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"it could not be decoded ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or 32-bit grayscale: scaled to 8 bits instead of clipped at 255; float images
        # (scientific TIFFs) are read as 0..1 when their values lie there, else as 0..255.
        import numpy as np

        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F":
            top = 1.0 if arr.max() <= 1.0 else 255.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype("uint8"), mode="L")
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
