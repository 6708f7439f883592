"""Image folders and archives of them (.tar, .tar.gz, .zip): which file is which class
and split, their bytes, and a digest of them (imagecache.py decodes them once).

Layout, as datasets are shipped (torchvision's ImageFolder, the CIFAR-10 and ImageNet
mirrors): a class is a sub-folder, holding its images at any depth; `train/` beside
`test/` (or `val/`; `training/` and `testing/`; in any case) gives the two splits; a
single top folder wrapping everything is looked through. With no class folders, the
images form one unlabelled class. Archives are read in memory, never extracted to disk.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from diffcli.errors import UserError

log = logging.getLogger("diffcli")

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
# The splits' folders, matched in any case ("Train", "TEST"), each list in order of preference;
# "training"/"testing" as in the MNIST-as-PNG mirrors.
TRAIN_FOLDERS = ("train", "training")
TEST_FOLDERS = ("test", "testing", "val", "valid", "validation")
MAX_MEMBER_BYTES = 256 << 20  # an archive member larger than this is not a picture for this tool


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVES)


# --- which file is which ------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    from diffcli.files import IMAGE_EXTENSIONS

    parts = PurePosixPath(name).parts
    # hidden files and folders, and the resource forks macOS puts in zips (__MACOSX/, ._x.jpg)
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def layout(names: list[str]) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """({split: [(file, class index)]}, class names) for the image files `names` (relative,
    '/'-separated). Splits: "train", and "test" when a test/ (or val/) folder sits beside
    train/ (TRAIN_FOLDERS, TEST_FOLDERS, in any case). Classes are the training split's
    sub-folders, in sorted order. Images lying beside the folders that matter are left
    out, with a note."""
    files = sorted((PurePosixPath(n).parts, n) for n in names)
    depth = 0
    while True:
        inside = [p for p, _ in files if len(p) > depth + 1]  # files within a folder at this level
        folders = {p[depth] for p in inside}
        holds_folders = lambda f: all(len(p) > depth + 2 for p in inside if p[depth] == f)  # noqa: E731
        train, test = _split_folder(folders, TRAIN_FOLDERS), _split_folder(folders, TEST_FOLDERS)
        has_splits = train is not None and (test is not None or holds_folders(train))
        # one folder wrapping everything, holding only folders itself, or the splits: look inside it
        only = next(iter(folders)) if len(folders) == 1 else None
        inner = {p[depth + 1] for p in inside if p[depth] == only and len(p) > depth + 2}
        if has_splits or not inner or not (holds_folders(only) or _split_folder(inner, TRAIN_FOLDERS)):
            break
        depth += 1
    _left_out([n for p, n in files if len(p) <= depth + has_splits], "beside the top folders")
    if has_splits:  # (a train/ holding images itself, among class folders and with no test/ beside it, is a class)
        _left_out([n for p, n in files if len(p) > depth + 1 and p[depth] not in (train, test)],
                  f"outside {train}/{f' and {test}/' if test else ''}")
        groups = {split: [(p[depth + 1:], n) for p, n in files if len(p) > depth + 1 and p[depth] == folder]
                  for split, folder in (("train", train), ("test", test)) if folder}
    else:
        groups = {"train": [(p[depth:], n) for p, n in files if len(p) > depth]}
    classes = sorted({rel[0] for rel, _ in groups["train"] if len(rel) > 1})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, members in groups.items():
        unknown = sorted({rel[0] for rel, _ in members if len(rel) > 1} - set(index))
        if unknown:
            raise UserError(f"the {split} split has class folder(s) {', '.join(unknown)} that the training split lacks.")
        if not classes:
            out[split] = [(n, 0) for _, n in members]
            continue
        out[split] = [(n, index[rel[0]]) for rel, n in members if len(rel) > 1]
        _left_out([n for rel, n in members if len(rel) == 1], f"beside the class folders of the {split} split")
        if not out[split]:
            raise UserError(f"the {split} split holds no images inside class folders.")
    return out, classes


def _split_folder(folders: set[str], names: tuple[str, ...]) -> str | None:
    """The folder among `folders` that holds the split called one of `names`, in any case."""
    by_name = {f.lower(): f for f in sorted(folders)}  # of "Train" and "train", the latter (sorted last)
    return next((by_name[n] for n in names if n in by_name), None)


def _left_out(names: list[str], where: str) -> None:
    if names:
        log.warning("left out %d image(s) lying %s, such as %s", len(names), where, names[0])


# --- reading a source -------------------------------------------------------------

def _folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The image files under `folder`, and the names of those left out as links whose target
    is gone (a file that cannot be read for another reason stops the run in one sentence)."""
    found, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):  # a class folder may be a link
        seen.add(os.path.realpath(here))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(here) / d) not in seen)
        found += [Path(here) / f for f in sorted(files)]
    files, gone = [], []
    for p in found:
        name = p.relative_to(folder).as_posix()
        if not _is_image_name(name):
            continue
        if p.exists():  # follows the link
            files.append(p)
        else:
            gone.append(name)
    return files, gone


def names_in(source: Path) -> list[str]:
    """The image files of a folder or an archive, as '/'-separated names within it."""
    if source.is_dir():
        files, gone = _folder_files(source)
        _left_out(gone, "behind links whose target is gone")
        return [p.relative_to(source).as_posix() for p in files]
    try:
        if source.name.lower().endswith(".zip"):
            with zipfile.ZipFile(source) as z:
                names = [_zip_name(i) for i in z.infolist() if not i.is_dir()]
        else:
            with tarfile.open(source, "r:*") as t:
                names = [m.name for m in t if _is_file(m)]
                _check_the_tar_ended(t, source, len(names))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        kind = " (it is a zip file: name it .zip)" if not source.name.lower().endswith(".zip") and zipfile.is_zipfile(source) else ""
        raise UserError(f"cannot read the archive '{source}' ({_first_line(e)}){kind}.") from None
    from diffcli.files import IMAGE_EXTENSIONS

    outside = [n for n in names if _outside(n)]
    _left_out([n for n in outside if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS],
              "outside the archive's own folders (named from / or with '..')")
    return [n for n in names if _is_image_name(n) and n not in outside]


def _outside(name: str) -> bool:
    """A member named from the root, a drive, or with '..': extracted, it would land outside
    the archive's folder (tar and unzip refuse such names), so it is not the data's."""
    parts = PurePosixPath(name).parts
    return PurePosixPath(name).is_absolute() or ".." in parts or bool(parts and parts[0].endswith(":"))


def _check_the_tar_ended(t: tarfile.TarFile, source: Path, files: int) -> None:
    """tarfile stops without a word at a damaged header past the first, as if the archive
    ended there: past the last member it read there must be only the end's zero blocks."""
    t.fileobj.seek(t.offset)
    try:
        while chunk := t.fileobj.read(1 << 20):
            if chunk.count(0) != len(chunk):
                log.warning("the archive '%s' is damaged after its first %d file(s): what follows cannot be read, "
                            "so those are all that is used", source, files)
                return
    except (EOFError, OSError, lzma.LZMAError, zlib.error):  # a compressed stream cut short past the last member
        log.warning("the archive '%s' ends early, after its %d file(s): it may have been cut short", source, files)


def _first_line(e: Exception) -> str:
    """The error's name and first line: tarfile lists every compression it tried, one a line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip(':')}".rstrip(": ")


def _zip_name(info: zipfile.ZipInfo) -> str:
    # Some Windows tools write backslashes where the zip format says "/"; unzip reads both.
    return info.filename.replace("\\", "/")


def _is_file(member: tarfile.TarInfo) -> bool:
    return member.isfile() or member.islnk()  # a hard link is a second name for a file's bytes


def contents(source: Path, wanted: set[str]):
    """(name, bytes) of each wanted file, in the source's own order, each name once; archives
    are read in one pass and never extracted to disk. A member that cannot be read (a bad
    checksum, encryption, a compression zipfile lacks) is skipped with a warning, as an
    image that cannot be decoded is."""
    wanted = set(wanted)  # (emptied as it is read; the caller's is left alone)
    if source.is_dir():
        for name in sorted(wanted):
            yield name, (source / name).read_bytes()
    elif source.name.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                name = _zip_name(info)
                if name in wanted and _small_enough(name, info.file_size):
                    wanted.discard(name)  # a name stored twice is one image, as in a tar
                    if (data := _read_member(name, lambda: z.read(info))) is not None:
                        yield name, data
    else:
        with tarfile.open(source, "r:*") as t:
            for m in t:
                if _is_file(m) and m.name in wanted and _small_enough(m.name, m.size):
                    wanted.discard(m.name)  # a name appended twice (tar -r) is one image
                    if (data := _read_member(m.name, lambda: t.extractfile(m).read())) is not None:
                        yield m.name, data


def _read_member(name: str, read) -> bytes | None:
    try:
        return read()
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError,
            RuntimeError, KeyError) as e:
        log.warning("skipping %s: it cannot be read from the archive (%s)", name, _first_line(e))
        return None


def _small_enough(name: str, size: int) -> bool:
    if size > MAX_MEMBER_BYTES:
        log.warning("skipping %s: %d MB, more than the %d MB diffcli reads from an archive",
                    name, size >> 20, MAX_MEMBER_BYTES >> 20)
        return False
    return True


def source_digest(source: Path) -> str:
    """SHA-256 of the source's bytes: an archive's file, or a folder's image files with their
    names (0.03 s for the 20 MB CIFAR-10 archive, 1-2 s for the same images as a folder)."""
    h = hashlib.sha256()
    try:
        if source.is_dir():
            for p in _folder_files(source)[0]:
                data = p.read_bytes()
                h.update(f"{p.relative_to(source).as_posix()}\0{len(data)}\0".encode())
                h.update(data)
        else:
            with source.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read '{e.filename or source}' ({e.strerror}).") from None
    return h.hexdigest()
