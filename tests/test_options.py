"""Every number option of every command, found by walking the Typer app itself, is refused
when it is NaN, ±infinity or out of its declared range: exit 1, one sentence naming the
option, nothing written. An option added later is walked too, so it cannot skip the check."""

import inspect
import os
import typing

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from diffcli.checks import Range
from diffcli.cli import app
from diffcli.cli._common import Sets

runner = CliRunner()


def commands(typer_app, group=None, prefix=()):
    """(command path, the function behind it, its click command) for every command."""
    group = group or typer.main.get_command(typer_app)
    for info in typer_app.registered_commands:
        yield (*prefix, info.name), inspect.unwrap(info.callback), group.commands[info.name]
    for sub in typer_app.registered_groups:
        yield from commands(sub.typer_instance, group.commands[sub.name], (*prefix, sub.name))


def declared_range(fn, name: str) -> tuple[Range | None, str | None]:
    """(the Range the option declares, the config key it sets, if any)."""
    hint = typing.get_type_hints(fn, include_extras=True)[name]
    for mark in getattr(hint, "__metadata__", ()):
        if isinstance(mark, Range):
            return mark, None
        if isinstance(mark, Sets):
            section = {"DataConfig": "data", "TrainConfig": "train", "DiffusionConfig": "diffusion",
                       "ModelConfig": "model", "DistillConfig": "distill"}.get(mark.cls.__name__)
            return mark.range, f"{section}.{mark.name}" if section else None
    return None, None


def number_type(fn, name: str):
    """int or float for a number option (Optional and Annotated unwrapped), else None."""
    hint = typing.get_type_hints(fn)[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return kinds[0] if kinds[0] in (int, float) else None


def number_options():
    cases = []
    for path, fn, cmd in commands(app):
        for param in cmd.params:
            if isinstance(param, typer.core.TyperOption) and number_type(fn, param.name):
                cases.append(pytest.param(path, fn, param, id=f"{' '.join(path)} {param.opts[0]}"))
    return cases


CASES = number_options()


def test_the_walk_finds_the_options_of_every_command():
    found = {(" ".join(p.values[0]), p.values[2].opts[0]) for p in CASES}
    for expected in [("sample", "--guidance"), ("sample", "--eta"), ("sample", "--n"), ("compare", "--n"),
                     ("eval", "--real-n"), ("train", "--lr"), ("train", "--batch-size"), ("noise-preview", "--frames"),
                     ("classifier train", "--epochs")]:
        assert expected in found
    assert len(found) > 35


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    """Valid values for the options a command requires."""
    folder = tmp_path_factory.mktemp("inputs")
    picture = folder / "in.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(picture)
    return {"--ckpt": str(tiny_run / "model.safetensors"), "--data": "shapes", "CKPT": str(tiny_run / "model.safetensors"),
            "IMAGE": str(picture), "IMAGES": str(picture), "--label": "0", "--classifier": str(folder / "judge.safetensors")}


def invoke(path, cmd, inputs, option, value, workdir, *more):
    args = [*path, *more]
    for param in cmd.params:
        if param.required:
            args += [inputs[param.name.upper()]] if isinstance(param, typer.core.TyperArgument) else [param.opts[0],
                                                                                                      inputs[param.opts[0]]]
    if path == ("noise-preview",):
        args.append(inputs["IMAGE"])
    old = os.getcwd()
    os.chdir(workdir)  # every default output path is relative: nothing may appear here
    try:
        return runner.invoke(app, [*args, option, value])
    finally:
        os.chdir(old)


def refused(result, names, workdir):
    text = " ".join(result.output.split())
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and text.count("error:") == 1, result.output
    assert any(name in text for name in names), text
    assert not list(workdir.iterdir()), f"wrote {list(workdir.iterdir())}"


@pytest.mark.parametrize("path,fn,param", CASES)
def test_every_number_option_refuses_nan_infinity_and_out_of_range(path, fn, param, inputs, tmp_path):
    option = param.opts[0]
    bounds, key = declared_range(fn, param.name)
    names = [option] + ([key] if key else [])
    kind = number_type(fn, param.name)
    assert bounds is not None and (bounds.low is not None or bounds.high is not None), \
        f"{' '.join(path)} {option} declares no range (an Annotated Range, or Sets of a bounded field)"
    values = ["nan", "inf", "-inf"] if kind is float else []
    if bounds is not None and bounds.low is not None:
        values.append(str(int(bounds.low) - 1 if kind is int else bounds.low - 0.5))
    if bounds is not None and bounds.high is not None:
        values.append(str(int(bounds.high) + 1 if kind is int else bounds.high + 0.5))
    for value in values:
        work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        refused(invoke(path, param_command(path), inputs, option, value, work), names, work)


def param_command(path):
    for p, _, cmd in commands(app):
        if p == path:
            return cmd
    raise KeyError(path)


def test_the_check_can_fail(inputs, tmp_path):
    """A value inside the range passes the check (and the command then runs)."""
    r = invoke(("sample",), param_command(("sample",)), inputs, "--guidance", "1.5", tmp_path,
               "--label", "0", "--n", "1", "--steps", "2")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "samples.png").exists()
