"""The one exception type a user can cause.

Core modules raise `UserError` with a single readable sentence; `cli.py` prints it
and exits non-zero. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, missing data)."""
