"""Nothing lost, nothing trusted blindly: signals, kills, NaNs, full disks (docs/reliability.md)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffcli import files, training
from diffcli.checkpoint import load_model, model_metadata, read_header
from diffcli.cli import app

runner = CliRunner()
TINY = ["--data", "shapes", "--limit", "64", "--preset", "tiny"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def saved_step(run: Path) -> int:
    return model_metadata(read_header(run / "model.safetensors"))["step"]


def spawn(*args, cwd=None, env=None):
    exe = Path(sys.executable).parent / "diffcli"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffcli"]
    return subprocess.Popen(cmd + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def has_step(run: Path, step: int) -> bool:
    try:
        return saved_step(run) >= step
    except Exception:
        return False


# --- NaN / inf ------------------------------------------------------------------


def nan_at(monkeypatch, bad_step):
    real = training.diffusion_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == bad_step else value

    monkeypatch.setattr(training, "diffusion_loss", loss)


def test_nonfinite_loss_stops_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, 7)
    r = cli("train", *TINY, "--max-steps", "20", "--sample-every", "5", "--out", tmp_path / "run")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in text
    assert "NaN or infinite at step 7" in text and "last checkpoint (step 5)" in text and "--on-nonfinite rollback" in text
    model, _, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_rolls_back_when_asked(tmp_path, monkeypatch):
    nan_at(monkeypatch, 7)
    r = cli("train", *TINY, "--max-steps", "20", "--sample-every", "5", "--on-nonfinite", "rollback", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "rolled back to step 5" in " ".join(r.output.split())
    state = load_file(str(tmp_path / "run" / "train_state.safetensors"))
    assert saved_step(tmp_path / "run") == 20 and all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


def test_a_rollback_that_cannot_mend_says_so_instead_of_suggesting_itself(tmp_path, monkeypatch):
    real = training.diffusion_loss  # every loss from step 7 on is NaN: three rollbacks, then a stop
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) * (float("nan") if calls["n"] >= 7 else 1.0)

    monkeypatch.setattr(training, "diffusion_loss", loss)
    r = cli("train", *TINY, "--max-steps", "20", "--sample-every", "5", "--on-nonfinite", "rollback", "--out", tmp_path / "run")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "--on-nonfinite rollback could not recover (3 rollbacks did not mend it)" in text, text
    assert "or pass --on-nonfinite rollback" not in text


# --- disk ---------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_fsync, run = os.fsync, tmp_path / "run"

    full_after = run / "samples" / "latest.png"  # the disk fills up once the first checkpoint and grid are there

    def fsync(fd):
        if full_after.exists():
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    r = cli("train", *TINY, "--max-steps", "8", "--sample-every", "4", "--out", tmp_path / "run")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in text, text
    assert "No space left on device" in text and "previous checkpoint there is intact" in text
    assert saved_step(tmp_path / "run") == 4
    assert not list((tmp_path / "run").glob(".*.tmp")), "a temporary file was left behind"
    # full just before the first grid (written all or nothing, as the checkpoints are, but not synced)
    full_after, run, real_replace = tmp_path / "never", tmp_path / "run2", files.os.replace

    def replace(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    r = cli("train", *TINY, "--max-steps", "8", "--sample-every", "4", "--out", run)
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "could not write the grid for step 4" in text and "that step's checkpoint is saved" in text
    assert saved_step(run) == 4 and not list(run.rglob(".*.tmp"))


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    r = cli("train", *TINY, "--max-steps", "2", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "MB free" in " ".join(r.output.split())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_unwritable_output_folder_is_refused_before_training(tmp_path):
    if os.geteuid() == 0:
        locked = Path("/proc/diffcli-cannot-write-here")  # root ignores permission bits
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    r = cli("train", *TINY, "--max-steps", "2", "--out", locked / "run")
    assert r.exit_code == 1 and "cannot write to the output folder" in " ".join(r.output.split())


# --- kills and signals ----------------------------------------------------------


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    """2k steps in one go == k steps, SIGKILL at a random moment after the checkpoint at k,
    then --resume to 2k: weights, EMA, optimizer moments and RNG states all equal."""
    k = 30
    common = [*TINY, "--sample-every", str(k), "--seed", "3"]
    # The two runs go side by side, one core each (two threads each would spin against each other).
    one_core = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = spawn("train", *common, "--max-steps", 2 * k, "--out", tmp_path / "straight", env=one_core)
    victim = spawn("train", *common, "--max-steps", 100 * k, "--out", tmp_path / "killed", env=one_core)
    wait_for(lambda: has_step(tmp_path / "killed", k))
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # somewhere in steps k..2k
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert saved_step(tmp_path / "killed") == k, "the kill came after the next checkpoint; make k larger"
    assert straight.wait(120) == 0, straight.stderr.read()

    resumed = spawn("train", "--out", tmp_path / "killed", "--resume", "--max-steps", 2 * k, env=one_core)
    assert resumed.wait(120) == 0, resumed.stderr.read()
    a = load_file(str(tmp_path / "straight" / "train_state.safetensors"))
    b = load_file(str(tmp_path / "killed" / "train_state.safetensors"))
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"differs after resume: {different[:5]}"


def test_first_ctrl_c_saves_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = spawn("train", *TINY, "--max-steps", "100000", "--sample-every", "100000", "--out", run)
    wait_for(lambda: (run / "config.yaml").exists())
    time.sleep(1.0)  # into the training loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and "Traceback" not in err
    assert saved_step(run) > 0, "the interrupted run saved no checkpoint"
    assert "stopped by interrupt" in out
    assert f"next: diffcli train --out {run} --resume goes on from step {saved_step(run)}" in " ".join(out.split())


def test_second_ctrl_c_exits_at_once(tmp_path):
    run = tmp_path / "run"
    proc = spawn("train", *TINY, "--max-steps", "100000", "--sample-every", "100000", "--out", run)
    wait_for(lambda: (run / "config.yaml").exists())
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    seen = ""
    while "stopping after this step" not in seen:  # the first one has been handled...
        seen += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)  # ...so this one is a second Ctrl-C, not merged with the first
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in seen + err
    assert "interrupted" in err


CHILD = r"""
import sys, torch
from pathlib import Path
from diffcli.checkpoint import save_model
path = Path(sys.argv[1])
state = {"w": torch.zeros(1_000_000)}
for i in range(10**6):
    state["w"].fill_(i)
    save_model(path, state, {"model": {}}, [], step=i, epoch=0.0)
    if i == 0:
        print("ready", flush=True)
"""


def test_sigkill_during_save_never_leaves_a_broken_checkpoint(tmp_path):
    # 8 kills in all, as two files side by side (4 each, one core apiece): the start-up of
    # each child, not the kill, is what costs time.
    paths = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"]
    rng = random.Random(0)
    for _ in range(4):
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for path in paths]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        for path in paths:
            meta = model_metadata(read_header(path))
            tensors = load_file(str(path))
            assert torch.all(tensors["w"] == meta["step"]), "weights and metadata from different writes"


def test_ctrl_c_before_the_first_step_claims_no_model(tmp_path, capsys):
    """A new run (distill's, here in its loop's place) stopped before its first step saved
    nothing: no "model:" or "--resume" hint for a file that is not there."""
    import typer

    from diffcli.cli._progress import with_progress
    from diffcli.fitting import TrainResult

    stopped = lambda report, should_stop: TrainResult(0, 0.0, tmp_path / "run" / "model.safetensors", None, "interrupt")  # noqa: E731
    with pytest.raises(typer.Exit) as e:
        with_progress("distill", stopped)
    out = capsys.readouterr()
    assert e.value.exit_code == 130 and "nothing was saved" in out.err and "--resume goes on" not in out.out + out.err
