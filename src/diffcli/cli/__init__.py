"""The `diffcli` command. This file only builds the app and registers the commands;
each command family lives in its own module and reads: options, checks, one core call,
print. torch is imported inside the commands, never at module level, so `diffcli --help`
answers quickly.
"""

from __future__ import annotations

import typer

from diffcli import __version__
from diffcli.cli import distill, edit, ema, evaluate, hub, info, sample, train, tune
from diffcli.cli._common import console, user_command

app = typer.Typer(
    name="diffcli",
    help="Train class-conditional diffusion models on small image datasets and sample from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # as typer's default, written down: the help texts escape their brackets for it
)


def _version(value: bool):
    if value:
        console.print(f"diffcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")):
    """Train class-conditional diffusion models on small image datasets and sample from them."""
    from diffcli.allocator import keep_freed_memory

    keep_freed_memory()  # the process is ours: keep activation memory mapped between steps


COMMANDS = {  # name: function, in the order `diffcli --help` lists them
    "train": train.train,
    "distill": distill.distill,
    "sample": sample.sample,
    "compare": sample.compare,
    "eval": evaluate.evaluate,
    "tune-guidance": tune.tune_guidance,
    "ema": ema.ema,
    "edit": edit.edit,
    "interpolate": edit.interpolate,
    "export": hub.export,
    "import": hub.import_,
    "noise-preview": info.noise_preview,
    "inspect": info.inspect,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(user_command(_fn))
evaluate.classifier_app.command("train")(user_command(evaluate.classifier_train))
app.add_typer(evaluate.classifier_app, name="classifier")


def main() -> None:
    app()
