"""The one exception type a user can cause, and the one way a failed write becomes one.

Core modules raise `UserError` with a single readable sentence; the command layer
(cli/_common.py) prints it and exits non-zero. Anything else that escapes is a bug and
keeps its traceback. A leaf module: it imports nothing of diffcli.
"""

import contextlib
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, missing data)."""


def listed(names: list[str], most: int = 12) -> str:
    """Names for a one-line message: the first `most`, then "..." where there are more."""
    return ", ".join(names[:most] + (["..."] if len(names) > most else [])) or "none"


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failure to write `path` (a missing folder, no permission, a full disk, an
    unknown image extension) into one sentence naming the file."""
    try:
        yield
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"could not write '{path}': {reason}.") from None
