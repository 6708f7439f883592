"""Hypothesis fuzzing of the CLI: any combination of options and any malformed file ends
with exit code 0 (worked), 1 (a user error, one sentence) or 2 (the parser refused an
option), never an unhandled exception, and writes nothing outside the output folder."""

import json
import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffcli.cli import app

runner = CliRunner()
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def files_under(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def invoke_in(folder: Path, args: list[str]):
    """Run in `folder`; return the result and the files it changed outside folder/out."""
    watched = folder.parent
    before = files_under(watched)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    after = files_under(watched)
    changed = [p for p in after if before.get(p) != after[p] and (folder / "out") not in p.parents]
    return result, changed


def assert_clean(result, changed):
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert not changed, f"wrote outside the output folder: {changed}"


labels = st.one_of(st.just("all"), st.integers(-3, 12).map(str), st.text("abcirlestar,0123 ", max_size=12))


@FUZZ
@given(label=labels, n=st.integers(-1, 2), steps=st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([999, 1000, 1001])),
       sampler=st.sampled_from(["ddpm", "ddim", "dpm++", "lms", ""]), guidance=st.floats(-2, 6, allow_nan=False),
       eta=st.floats(-1, 2, allow_nan=False))
def test_sample_options(tiny_run, tmp_path_factory, label, n, steps, sampler, guidance, eta):
    folder = tmp_path_factory.mktemp("fuzz") / "work"
    folder.mkdir()
    if sampler == "ddpm" and steps in (None, 1000):
        steps = 3  # keep the fuzz fast: 1000-step DDPM runs are covered elsewhere
    args = ["sample", "--ckpt", str(tiny_run / "model.safetensors"), "--label", label, "--n", str(n), "--sampler", sampler,
            "--guidance", str(guidance), "--eta", str(eta), "--out", "out/s.png"]
    if steps is not None:
        args += ["--steps", str(steps)]
    run_files = files_under(tiny_run)
    assert_clean(*invoke_in(folder, args))
    assert files_under(tiny_run) == run_files, "sampling changed the run folder it read from"


def safetensors_like(header: dict, tail: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + tail


ckpt_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda tail: safetensors_like({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, tail), st.binary(max_size=16)),
    st.builds(lambda cfg, tail: safetensors_like({"__metadata__": {"format": "diffcli", "config": cfg}}, tail),
              st.text(max_size=30), st.binary(max_size=8)),
    st.builds(lambda n: struct.pack("<Q", n) + b"{}", st.integers(0, 2**64 - 1)),
)


@FUZZ
@given(content=ckpt_bytes, command=st.sampled_from(["sample", "inspect"]))
def test_malformed_checkpoints(tmp_path_factory, content, command):
    folder = tmp_path_factory.mktemp("fuzz") / "work"
    folder.mkdir()
    (folder / "m.safetensors").write_bytes(content)
    args = ["sample", "--ckpt", "m.safetensors", "--out", "out/s.png"] if command == "sample" else ["inspect", "m.safetensors"]
    result, changed = invoke_in(folder, args)
    assert_clean(result, changed)
    assert result.exit_code == 1


yaml_text = st.one_of(
    st.text(max_size=60),
    st.dictionaries(st.sampled_from(["model", "train", "data", "diffusion", "extra"]),
                    st.dictionaries(st.sampled_from(["lr", "batch_size", "base_channels", "schedule", "flip", "limit", "bogus"]),
                                    st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                                              st.none(), st.lists(st.integers(0, 3), max_size=3)), max_size=3),
                    max_size=3).map(lambda d: json.dumps(d)),  # JSON is YAML
)


@FUZZ
@given(text=yaml_text)
def test_malformed_configs(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz") / "work"
    folder.mkdir()
    (folder / "c.yaml").write_text(text)
    args = ["train", "--config", "c.yaml", "--data", "shapes", "--limit", "16", "--preset", "tiny", "--max-steps", "1",
            "--out", "out/run"]
    assert_clean(*invoke_in(folder, args))


@FUZZ
@given(content=st.binary(max_size=200), frames=st.integers(-2, 4), steps=st.one_of(st.none(), st.text("0123456789,-x", max_size=10)),
       size=st.integers(-4, 70))
def test_noise_preview_inputs(tmp_path_factory, content, frames, steps, size):
    folder = tmp_path_factory.mktemp("fuzz") / "work"
    folder.mkdir()
    (folder / "img.png").write_bytes(content)
    args = ["noise-preview", "img.png", "--frames", str(frames), "--image-size", str(size), "--out", "out/p.png"]
    if steps is not None:
        args += ["--steps", steps]
    assert_clean(*invoke_in(folder, args))
