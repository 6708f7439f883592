"""One run per folder (runlock.py): a second run into a folder being written is refused,
naming the holder; a holder killed with SIGKILL leaves nothing that blocks --resume."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffcli import runlock
from diffcli.checkpoint import model_metadata, read_header
from diffcli.cli import app
from diffcli.errors import UserError

TINY = ["--data", "shapes", "--limit", "64", "--preset", "tiny"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def holder(run) -> str:
    path = run / runlock.LOCK_FILE
    return path.read_text() if path.exists() else ""


def test_a_second_run_is_refused_while_the_first_writes_and_a_sigkilled_ones_lock_is_taken_over(tmp_path):
    from test_reliability import spawn, wait_for

    run = tmp_path / "run"
    first = spawn("train", *TINY, "--max-steps", "100000", "--sample-every", "5", "--out", run,
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: (run / "model.safetensors").exists() and holder(run))
        for second in (cli("train", *TINY, "--max-steps", "2", "--out", run),  # into the same folder, as a new run
                       cli("train", "--out", run, "--resume", "--max-steps", "100"),
                       cli("train", *TINY, "--max-steps", "2", "--out", run, "--overwrite")):
            assert second.exit_code == 1, second.output
            said = " ".join(second.output.split())
            assert f"is being written by another run (pid {first.pid} on {socket.gethostname()}, diffcli train since" in said
            assert "Traceback" not in said
        assert first.poll() is None, "the refusals must leave the first run alone"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert json.loads(holder(run))["pid"] == first.pid  # a kill leaves the text, not the lock
    step = model_metadata(read_header(run / "model.safetensors"))["step"]
    resumed = cli("train", "--out", run, "--resume", "--max-steps", step + 2)
    assert resumed.exit_code == 0, resumed.output
    assert "took over the lock" in " ".join(resumed.output.split()) and f"pid {first.pid}" in resumed.output
    assert holder(run) == ""  # released on the way out
    again = cli("train", "--out", run, "--resume", "--max-steps", step + 3)
    assert again.exit_code == 0 and "took over" not in again.output, again.output


def test_two_runs_started_together_into_one_folder_leave_one_run():
    """The lock is taken before the folder is checked, so of two processes racing into an
    empty folder exactly one trains; the other is refused."""
    # run in a child so both race from a cold start, as two terminals would
    code = r"""
import subprocess, sys, tempfile, pathlib, os
out = pathlib.Path(tempfile.mkdtemp()) / "run"
args = [sys.executable, "-m", "diffcli", "train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "40", "--out", str(out)]
env = {**os.environ, "OMP_NUM_THREADS": "1"}
ps = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
codes = sorted(p.wait(300) for p in ps)
errs = " ".join(" ".join(p.stderr.read().split()) for p in ps)
print(codes, "being written by another run" in errs or "already holds a run" in errs)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.stdout.strip() == "[0, 1] True", r.stdout + r.stderr


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locks: flock fails with ENOLCK, so the holder's text decides."""
    import fcntl

    def refuse(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_kernel_locks_a_live_holder_here_is_refused_and_a_dead_one_taken_over(tmp_path, no_flock):
    def left_by(pid, host=None):
        (tmp_path / runlock.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                               "since": 0, "command": "diffcli train"}))

    left_by(os.getppid())  # alive
    with pytest.raises(UserError, match=f"being written by another run \\(pid {os.getppid()} on"):
        with runlock.holding(tmp_path, "diffcli train"):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left_by(dead.pid)
    notes = []
    with runlock.holding(tmp_path, "diffcli train", notes.append):
        assert json.loads(holder(tmp_path))["pid"] == os.getpid()
    assert "took over" in notes[0] and holder(tmp_path) == ""
    left_by(dead.pid, host="another-node")  # cannot be checked from here: say which file to remove
    with pytest.raises(UserError, match=f"another machine .* remove '{tmp_path / runlock.LOCK_FILE}'"):
        with runlock.holding(tmp_path, "diffcli train"):
            pass


def test_distilling_a_run_still_being_trained_says_so(tiny_run, tmp_path):
    """Its teacher's model changes at each checkpoint, and a resume then finds another
    teacher: a note at the start, not a surprise later. `busy` takes nothing."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_run, teacher)
    assert runlock.busy(teacher) is None
    with runlock.holding(teacher, "diffcli train"):
        assert runlock.busy(teacher)["command"] == "diffcli train"
        r = cli("distill", "--teacher", teacher / "model.safetensors", "--max-steps", "1", "--batch-size", "4", "--steps", "2",
                "--teacher-steps", "2", "--out", tmp_path / "student")
        assert r.exit_code == 0, r.output
        assert "the teacher's run is still being written (pid" in " ".join(r.output.split())
    assert runlock.busy(teacher) is None
    r = cli("distill", "--teacher", teacher / "model.safetensors", "--max-steps", "1", "--batch-size", "4", "--steps", "2",
            "--teacher-steps", "2", "--out", tmp_path / "student2")
    assert r.exit_code == 0 and "still being written" not in r.output, r.output
