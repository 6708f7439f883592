"""Atomic file writes (a temporary file in the same folder, fsynced, then renamed over
the target, so a crash leaves either the old file or the new one, never half of one),
and file hashes.

A leaf module: it imports nothing of diffcli, so anything may use it without a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

# A run folder's two weight files (runs.py writes them): here, so that outputs.py can keep every
# other command from writing over them without importing torch.
MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.safetensors"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # what diffcli reads and writes as images


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` all or nothing, creating the parent folder; `durable` also
    syncs it to the disk, so that it outlives a power cut (for checkpoints; a picture is
    redrawn more cheaply than 10,000 of them are synced one by one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes 0600; the file ends as open() would leave it: a new one 0666 less the
    # umask, a replaced one with its own mode (best effort: some file systems refuse chmod).
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask()
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: no fchmod (Windows)
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def save_image(img, path: str | Path, **options) -> Path:
    """Save a PIL image by its extension (PNG unless told otherwise), creating the parent
    folder, all or nothing: a Ctrl-C or a full disk leaves the file that was there, never
    half of one. `options` go to PIL (a GIF's frames)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    img.save(buffer, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"), **options)
    atomic_write_bytes(path, buffer.getvalue(), durable=False)
    return Path(path)


def umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask can
    only set it, and setting it back leaves a moment when another thread sees 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
