"""Numbers a user gives, checked in one place.

A `Range` is declared once beside the setting it bounds (a config field's metadata, a
`SamplerSpec` field, a command-line option's `Annotated` type) and `check` applies it:
NaN and ±infinity are refused for every float, whatever its range, because a NaN
passes every comparison-based check (`nan < 0` is False) and turns into NaN images.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from diffcli.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded (a learning rate > 0)
    high_open: bool = False  # high itself is excluded (an EMA decay < 1)
    why: str = ""  # said after the bound, e.g. "a covariance needs two images"

    def describe(self) -> str:
        return self._bound() + (f" ({self.why})" if self.why else "")

    def _bound(self) -> str:
        lo, hi = self.low, self.high
        if hi is None:
            if lo is None:
                return "a finite number"
            if lo == 0:
                return "positive" if self.low_open else "0 or more"
            return f"{'above' if self.low_open else 'at least'} {lo:g}"
        if lo is None:
            return f"{'below' if self.high_open else 'at most'} {hi:g}"
        if not (self.low_open or self.high_open):
            return f"between {lo:g} and {hi:g}"
        return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def check(value, bounds: Range | None, name: str):
    """`value` itself when it is finite and inside `bounds` (None: any finite number);
    otherwise a UserError naming `name`. None passes: it means "not given"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}.")
    if bounds is not None and not bounds.contains(value):
        raise UserError(f"{name} must be {bounds.describe()}, got {value if isinstance(value, int) else f'{value:g}'}.")
    return value


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
SHARE = Range(0, 1, high_open=True)  # a probability that must leave something: [0, 1)
# Past 1024 px a single image fills gigabytes of activations: the largest this tool trains or draws.
IMAGE_SIZE = Range(4, 1024)
# Diffusion steps T: the literature's most is 4,000 (iDDPM); a typo's 1e11 filled memory with its tables.
TIMESTEPS = Range(2, 100_000)
# torch's generators take seeds below 2^63, and image i of a command uses SEED + i: room for any n
SEED = Range(0, 9 * 10**18, why="torch's seeds end at 2^63")


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # YAML 1.2's decimal numbers


def is_number(value, kind: type | tuple = (int, float)) -> bool:
    """A JSON or YAML number of `kind`, never a bool (which Python counts as an int)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def yaml_number(value, kind: type):
    """A config value as the number it spells: PyYAML (YAML 1.1) reads 1e-4, with no dot, as
    a string, where the command line's --lr 1e-4 is a number. Anything else is left as it is."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = float(value)
        return int(number) if kind is int and number.is_integer() else number
    return value


def bounded(default, bounds: Range):
    """A dataclass field whose values must lie in `bounds` (read by `check_fields`)."""
    return dataclasses.field(default=default, metadata={"range": bounds})


def field_range(cls, name: str) -> Range | None:
    """The Range declared on field `name` of dataclass `cls` (None: it has none): a CLI
    option that sets a field refers to it instead of declaring the bound again."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("range")


def check_fields(obj, name_of, skip: tuple[str, ...] = ()) -> None:
    """`check` every bounded field of dataclass `obj` but those in `skip`; `name_of(field)`
    names it in the error."""
    for f in dataclasses.fields(obj):
        if "range" in f.metadata and f.name not in skip:
            check(getattr(obj, f.name), f.metadata["range"], name_of(f.name))
