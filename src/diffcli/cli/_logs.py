"""Where the core's warnings go (a skipped image file, a read-only data folder, a damaged
cache entry): through rich on a terminal; piped, one plain line each, since rich lays a
message out in a grid of the console's width (80 when piped) and broke paths mid-name in logs."""

from __future__ import annotations

import logging
import sys

from diffcli.cli._common import err_console


class _Plain(logging.StreamHandler):
    """"WARNING  message" on one line, to the stderr of the moment (as rich's console writes:
    a test runner swaps it between commands, and a stream kept from an earlier one is closed)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    log = logging.getLogger("diffcli")
    if not log.handlers:
        from rich.logging import RichHandler

        log.addHandler(RichHandler(console=err_console, show_time=False, show_path=False) if err_console.is_terminal else _Plain())
        log.setLevel(logging.INFO)
