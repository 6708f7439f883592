"""What a command will write, checked against what it reads before any work starts: the
one place for the rules every command follows (docs/reliability.md).

1. An output never lands on an input: not the same file (by path, through links, or as a
   hard link), not inside a folder the command reads, and an output folder never holds an
   input. `--overwrite` does not change this.
2. A model file or folder that exists is replaced only with `--overwrite`.
3. Each output can be written where it is asked for: an image has an image extension, a
   model file ends in .safetensors, a file is not a folder, a folder is not a file, two outputs are not one file, and the
   nearest existing folder above each is writable.

Torch-free, so a refusal costs no start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from diffcli.errors import UserError
from diffcli.files import IMAGE_EXTENSIONS, MODEL_FILE, STATE_FILE

IMAGE, FILE, MODEL, FOLDER, MODEL_FOLDER = "image", "file", "model", "folder", "model folder"


@dataclass(frozen=True)
class Output:
    option: str  # how the user named it: --out, --save-individual, ...
    path: Path | None  # None: not asked for
    kind: str = FILE  # IMAGE, FILE, MODEL (a file under the overwrite rule), FOLDER, MODEL_FOLDER


def check(reads: dict[str, Path | Iterable[Path] | None], writes: Iterable[Output], overwrite: bool = False) -> None:
    """Refuse, in one sentence naming the options, any write that breaks the rules above."""
    inputs = [(name, Path(p)) for name, value in reads.items() for p in _many(value)]
    outs = [out for out in writes if out.path is not None]
    for i, out in enumerate(outs):
        for name, source in inputs:
            _apart(out, name, source)
        if twin := next((o for o in outs[:i] if o.path.resolve() == out.path.resolve()), None):
            raise UserError(f"{twin.option} and {out.option} both name '{out.path}'; give each its own file.")
        _writable(out, overwrite)


def _many(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # a hard link, or a path the resolver could not see through
    except OSError:
        return False


def inside(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies below it (an existing folder), links resolved: also
    below a folder that a link inside `outer` leads to, since reading `outer` reads that too
    (a class folder may be a link, folders.py)."""
    if not outer.is_dir():
        return False
    target = inner.resolve()
    return any(target.is_relative_to(folder) for folder in _folders_read(outer))


def _folders_read(outer: Path) -> set[Path]:
    """`outer` and the real folder behind each folder link below it, each walked once."""
    found = {outer.resolve()}
    for here, dirs, _ in os.walk(outer, followlinks=True):
        walk = []
        for d in dirs:
            path = Path(here) / d
            if d.startswith("."):  # hidden: not read (folders.py), so no output is inside it through here
                continue
            if path.is_symlink():
                real = path.resolve()
                if any(real.is_relative_to(f) for f in found):  # read already, another way: a loop cut
                    continue
                found.add(real)
            walk.append(d)
        dirs[:] = walk
    return found


def _apart(out: Output, name: str, source: Path) -> None:
    never = "; write somewhere else (--overwrite does not change this)."
    if _same(out.path, source):
        raise UserError(f"{out.option} '{out.path}' is the {name} this command reads{never}")
    if inside(out.path, source):
        raise UserError(f"{out.option} '{out.path}' is inside {name} '{source}', which this command reads{never}")
    if out.kind in (FOLDER, MODEL_FOLDER) and source.exists() and source.resolve().is_relative_to(out.path.resolve()):
        raise UserError(f"{out.option} '{out.path}' holds the {name} this command reads ('{source}'){never}")


def _writable(out: Output, overwrite: bool) -> None:
    path, option = out.path, out.option
    folder = out.kind in (FOLDER, MODEL_FOLDER)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{option} '{path}' is a file; give a folder.")
    if not folder and path.is_dir():
        raise UserError(f"{option} '{path}' is a folder; give a file name.")
    if out.kind == IMAGE and path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{option} must end in an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}), got '{path.name}'.")
    if out.kind == MODEL and path.suffix.lower() != ".safetensors":
        raise UserError(f"{option} must end in .safetensors (the format diffcli's model files are written in), got '{path.name}'.")
    if out.kind == MODEL and path.name in (MODEL_FILE, STATE_FILE) and (path.parent / STATE_FILE).is_file():
        raise UserError(f"{option} '{path}' is a training run's own file ('{path.parent}' holds a run); write somewhere else "
                        "(--overwrite does not change this).")
    if out.kind == MODEL and path.exists() and not overwrite:
        raise UserError(f"{option} '{path}' already exists; pass --overwrite to replace it, or give another {option}.")
    if out.kind == MODEL_FOLDER and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{option} '{path}' is not empty; pass --overwrite to write into it, or give a new folder.")
    above = path if folder and path.is_dir() else path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{option} '{path}' cannot be made: '{above}' is a file.")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{path}' cannot be written: no permission to write in '{above}'.")
