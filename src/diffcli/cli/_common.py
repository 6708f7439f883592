"""What the commands share: consoles, exit codes, the user-error wrapper with the one
numeric check, the options several commands take (declared once), label and list
parsing and the output-error context (the progress bar: _progress.py).

torch is never imported here: `diffcli --help` must stay fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from diffcli.checks import AT_LEAST_ONE, SEED, Range, check, field_range
from diffcli.errors import UserError, listed, writing  # noqa: F401  (writing: for the commands)
from diffcli.spec import DEFAULT_STEPS, GUIDANCE_CEILING, GUIDANCE_FLOOR, SamplerSpec

# Lines are not broken at the console's width (80 when piped): a path or a `next:` command split
# in two could not be copied or grepped from a log; the terminal wraps them on screen. Tables still fit.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_USER_ERROR = 1  # a problem the user can fix; usage errors from the parser exit 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention


@dataclass(frozen=True)
class Sets:
    """Marks an option that sets field `name` of a core dataclass (a config section, the
    `SamplerSpec`): the core checks it against the Range declared on that field."""
    cls: type
    name: str

    @property
    def range(self) -> Range | None:
        return field_range(self.cls, self.name)


def option_name(param: inspect.Parameter, hint) -> str:
    """How the user wrote this option: its first declared flag, else --the-name."""
    info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.ParameterInfo)), None)
    if isinstance(info, typer.models.ArgumentInfo):
        return param.name.upper()
    # In an Annotated option typer takes a first flag given positionally as the `default`.
    first = (info.default,) if isinstance(getattr(info, "default", None), str) else ()
    flags = [d for d in (*first, *(getattr(info, "param_decls", None) or ())) if d.startswith("--")]
    return flags[0].split("/")[0] if flags else "--" + param.name.replace("_", "-")


def check_numbers(fn, values: dict) -> None:
    """Every number the user gave to `fn`: NaN and ±infinity refused for every float, and
    each literal `Range` in the option's Annotated type enforced. Options marked `Sets` are
    left to the core they set, which checks them against the field's own Range."""
    hints = typing.get_type_hints(fn, include_extras=True)
    for param in inspect.signature(fn).parameters.values():
        value, hint = values.get(param.name), hints.get(param.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)), None)
        check(value, bounds, option_name(param, hint))


def user_command(fn):
    """Check the numbers, then run; a UserError becomes one sentence on stderr and exit 1,
    Ctrl-C exit 130, both without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_numbers(fn, kwargs)
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    return wrapper


def print_notice(message: str) -> None:
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)


def as_json_text(report) -> str:
    """A report as JSON, NaN and infinities as null: JSON has no such numbers, and strict
    readers (jq, JSON.parse) refuse Python's NaN."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list) else value
    return json.dumps(finite(report), indent=2)


def safe_name(text: str) -> str:
    """`text` as a piece of a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


def parse_labels(text: str, class_names: list[str], option: str = "--label") -> list[int]:
    """'all', '3', 'cat', '1,cat,7' -> class indices; unconditional models take only 'all'.
    `option` is how a refusal names the option the text came from."""
    k = len(class_names)
    if k == 0:
        if text.strip().lower() not in ("all", ""):
            raise UserError(f"this model was trained without classes; use {option} all.")
        return [0]  # index num_classes (= 0) is the "no label" token
    if text.strip().lower() == "all":
        return list(range(k))
    exact = {name: i for i, name in enumerate(class_names)}
    folded: dict[str, list[int]] = {}  # any case; "Cat" and "cat" may both be classes
    for i, name in enumerate(class_names):
        folded.setdefault(name.lower(), []).append(i)
    whole = text.strip()
    parts = [whole] if whole in exact or len(folded.get(whole.lower(), [])) == 1 else text.split(",")  # a class named "x,y"
    out = []
    for part in (p.strip() for p in parts):
        matches = [exact[part]] if part in exact else folded.get(part.lower(), [])
        if len(matches) > 1:
            raise UserError(f"{option} '{part}' could be any of the classes {', '.join(class_names[i] for i in matches)}; "
                            "write one as it is spelled.")
        if matches:
            out.append(matches[0])
        elif part.lstrip("-").isdigit():
            i = int(part)
            if not 0 <= i < k:
                raise UserError(f"{option} {i} is out of range: this model has classes 0..{k - 1}.")
            out.append(i)
        else:
            raise UserError(f"{option}: unknown class '{part}'; this model's classes are: {listed(class_names)}.")
    return out


def parse_list(text: str, kind: type, option: str, bounds: Range | None = None) -> list:
    """'10,20,50' -> [10, 20, 50], each checked as one number option is; '4,,5' is refused (a value left out?)."""
    parts = text.split(",")
    if len(parts) > 1 and not all(p.strip() for p in parts):
        raise UserError(f"{option} has an empty item in '{text}'; separate the values with single commas.")
    try:
        values = [kind(v) for v in parts if v.strip()]
    except ValueError:
        what = {int: "whole numbers", float: "numbers"}.get(kind, "values")
        raise UserError(f"{option} must be a comma-separated list of {what}, got '{text}'.") from None
    if not values:
        raise UserError(f"{option} is empty.")
    return [check(v, bounds, option) for v in values]


# --- options used by several commands, declared once ------------------------------

Ckpt = Annotated[Path, typer.Option(help="A model.safetensors written by `diffcli train`.")]
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda or mps."
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]
ImageSeed = Annotated[int, typer.Option(help="Image i is made from seed SEED+i, whatever the batch size."), SEED]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass."), AT_LEAST_ONE]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DATA_ROOT_HELP = "Where named datasets live or are downloaded to (default: $DIFFCLI_DATA_ROOT, else ~/.cache/diffcli/datasets)."
DataRoot = Annotated[Optional[str], typer.Option(help=DATA_ROOT_HELP)]
Sampler = Annotated[str, typer.Option(help="ddpm (stochastic, all T steps), ddim, euler (deterministic DDIM: Euler on the ODE), "
                                           "dpm++ (DPM-Solver++ 2M) or heun (EDM's 2nd order: two network passes a step).")]
Shift = Annotated[float, typer.Option(help="SD3's time shift: above 1 moves the steps toward the noise, which helps few-step "
                                           "sampling of flow models (1: none)."), Sets(SamplerSpec, "shift")]
Spacing = Annotated[str, typer.Option(help="How the steps spread over the timesteps: trailing (even, from T-1) or karras "
                                           "(EDM's rho=7, denser at low noise).")]
Steps = Annotated[Optional[int], typer.Option(help="Sampling steps (default: " + ", ".join(
    f"{name} {k}" for name, k in DEFAULT_STEPS.items()) + ", ddpm T)."), Sets(SamplerSpec, "steps")]
Eta = Annotated[float, typer.Option(help="DDIM noise: 0 deterministic, 1 DDPM-like."), Sets(SamplerSpec, "eta")]
GUIDANCE_HELP = ("Classifier-free guidance weight: 1 plain conditional, 0 unconditional (default: from how many "
                 f"images the model was trained on, {GUIDANCE_CEILING:g} for a short run down to {GUIDANCE_FLOOR:g}; docs/usage.md).")
Guidance = Annotated[Optional[float], typer.Option(help=GUIDANCE_HELP), Sets(SamplerSpec, "guidance")]
GuidanceInterval = Annotated[Optional[str], typer.Option(
    help="Guide only at noise levels LOW < sigma <= HIGH, as 'LOW,HIGH' (HIGH may be inf; "
         "Kynkäänniemi et al. 2024); elsewhere the plain conditional model (default: every step).")]


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'0.3,5' -> (0.3, 5.0), 'inf' allowed as HIGH; SamplerSpec checks the values."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:  # not two parts, or not numbers
        raise UserError(f"--guidance-interval takes two noise levels, LOW,HIGH; got '{text}'.") from None
    return low, high


# Help is rich markup (cli/__init__.py), where a bare [tensorboard] would be read as a style and vanish.
LOG_HELP = "Experiment trackers: none, tensorboard, wandb, or tensorboard,wandb (each an extra: pip install 'diffcli\\[tensorboard]')."
WANDB_PROJECT_HELP = "The W&B project (default: $WANDB_PROJECT, else W&B's own)."
