"""One run per folder: a lock that `train`, `distill` and `ema` hold on a run folder while
they write it, so that a second run into the same folder is refused instead of mixing its
files with the first's.

The lock is the kernel's (`flock` on `.diffcli.lock` in the folder), so it goes when its
holder goes, however it ends: a SIGKILLed run leaves no lock to clean up, and a node lost
with its file system's lease gives its lock back when the lease ends. The file also holds
who took it (pid, host, when, the command), which is all a refusal can name; a holder that
left that text behind without its lock was killed, and the next run takes over and says so.
Where the file system has no locks, the text alone decides: a holder on this host that
is no longer running is stale; one on another host is refused, naming the file to remove.

Under torchrun only rank 0 takes it, as only rank 0 writes. A leaf module but for errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from diffcli.errors import UserError

LOCK_FILE = ".diffcli.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def holder_text(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, {holder.get('command', 'a run')} since {since}"


@contextlib.contextmanager
def holding(folder: Path, command: str, notice: Callable[[str], None] = lambda message: None,
            advice: str = "wait for it to end, or give another --out") -> Iterator[None]:
    """Hold `folder`'s lock for the body, or refuse in one sentence naming its holder and `advice`."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, mine = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:  # a teammate's lock file in a shared folder: flock works on a read-only one too
        try:
            fd, mine = os.open(path, os.O_RDONLY), False
        except OSError as e:
            raise UserError(f"cannot open the lock file '{path}' ({e.strerror}).") from None
    except OSError as e:
        raise UserError(f"cannot write to the output folder '{folder}' ({e.strerror}).") from None
    try:
        if not _lock(fd, _read(fd), path, folder):
            raise UserError(f"'{folder}' is being written by another run ({holder_text(_read(fd))}); {advice}.")
        if left := _read(fd):  # read again under the lock: a holder that ended well has cleared it
            notice(f"took over the lock of '{folder}' from a run that ended without releasing it ({holder_text(left)}).")
        if mine:
            _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command})
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # a full disk must not hide the error that ended the run
                if mine:
                    _write(fd, None)  # the file stays: removing it would let a run lock a file nobody else can see
            _unlock(fd)
    finally:
        os.close(fd)


def busy(folder: Path) -> dict | None:
    """Who holds `folder`'s lock, while a live process does (a run being written: its model
    changes at each checkpoint); None when no one does, or where locks cannot tell. Takes nothing."""
    try:
        import fcntl

        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock is refused while a holder has its exclusive one
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read(fd) or None  # (no text: another probe's moment, not a run)
    except OSError:
        return None
    finally:
        os.close(fd)


def _lock(fd: int, left: dict, path: Path, folder: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return _by_text(left, path, folder)
    for attempt in range(2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt or _read(fd):  # held by a run that says so
                return False
            time.sleep(0.1)  # held without a word: `busy`'s shared probe, for an instant
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return _by_text(left, path, folder)
            raise UserError(f"cannot lock '{path}' ({e.strerror}).") from None
    return False


def _unlock(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _by_text(left: dict, path: Path, folder: Path) -> bool:
    """Without kernel locks: free unless the holder it names is still running here."""
    if not left:
        return True
    if left.get("host") != socket.gethostname():
        raise UserError(f"'{folder}' is locked by a run on another machine ({holder_text(left)}), and this file system "
                        f"cannot tell whether it still runs; if it does not, remove '{path}'.")
    try:
        return not _running(int(left.get("pid", -1)))
    except (TypeError, ValueError):  # text nobody wrote as a holder: nothing runs under it
        return True


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, as another user's process
    return True


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = {"command": "an unknown run"}
    return value if isinstance(value, dict) else {}


def _write(fd: int, holder: dict | None) -> None:
    os.ftruncate(fd, 0)
    if holder:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder).encode())
