"""torchrun on the CPU with gloo: two processes follow one process's trajectory."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from diffcli.checkpoint import model_metadata, read_header

# fp32 on every CPU: under bf16 (--precision auto on an AMX or AVX512-BF16 CPU) two half batches round
# differently from one whole batch (1e-5 after 6 steps), which would hide what this checks.
ARGS = ["--data", "shapes", "--limit", "64", "--preset", "tiny", "--batch-size", "8", "--sample-every", "6", "--seed", "5",
        "--precision", "fp32"]


def diffcli(*args, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "diffcli"]
    else:
        cmd = [sys.executable, "-m", "diffcli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_equal_one_on_the_same_global_batches_and_resume_in_one(tmp_path):
    two = diffcli("train", *ARGS, "--max-steps", "6", "--out", tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2" in two.stderr and "rank 1 of 2" in two.stderr, "both ranks must have run"
    assert "global batch 8 over 2 processes (4 each)" in " ".join(two.stdout.split())
    one = diffcli("train", *ARGS, "--max-steps", "6", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]

    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files.count("model.safetensors") == 1 and files.count("train_state.safetensors") == 1
    assert not [f for f in files if f.endswith(".tmp")], files
    steps = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1, "metrics were written by more than one rank"

    a = load_file(str(tmp_path / "two" / "train_state.safetensors"))
    b = load_file(str(tmp_path / "one" / "train_state.safetensors"))
    for name in a:
        if name.startswith(("model.", "ema.")):
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), f"{name} differs by {(a[name] - b[name]).abs().max():.2e}"
    assert torch.equal(a["rng.batch"], b["rng.batch"]), "the batch generator drifted"

    # and a two-process run resumes in one process
    resumed = diffcli("train", "--out", tmp_path / "two", "--resume", "--max-steps", "9")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_metadata(read_header(tmp_path / "two" / "model.safetensors"))["step"] == 9


def test_a_distillation_over_two_processes_equals_one(tiny_run, tmp_path):
    """Each rank follows its share of the teacher paths; DDP averages the student's gradients."""
    from typer.testing import CliRunner

    from diffcli.cli import app

    args = ["distill", "--teacher", tiny_run / "model.safetensors", "--steps", "2", "--teacher-steps", "4",
            "--batch-size", "8", "--max-steps", "3", "--device", "cpu", "--precision", "fp32"]  # fp32: as ARGS
    two = diffcli(*args, "--out", tmp_path / "two", nproc=2)
    assert two.returncode == 0 and "rank 1 of 2" in two.stderr, two.stderr[-3000:]
    one = CliRunner().invoke(app, [str(a) for a in args] + ["--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = (load_file(str(tmp_path / name / "train_state.safetensors")) for name in ("two", "one"))
    for name in a:
        if name.startswith(("model.", "ema.")):
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), f"{name} differs by {(a[name] - b[name]).abs().max():.2e}"


def test_batch_that_does_not_divide_is_refused(tmp_path):
    r = diffcli("train", *ARGS, "--batch-size", "7", "--max-steps", "2", "--out", tmp_path / "run", nproc=2)
    assert r.returncode != 0
    assert "does not divide among 2 processes" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr.split("error:")[0][-200:]


def test_a_dead_rank_stops_the_others_instead_of_hanging(tmp_path):
    import re
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffcli",
           "train", *ARGS, "--max-steps", "100000", "--sample-every", "100000", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    pid = None
    while pid is None:
        line = proc.stderr.readline()
        assert line, "torchrun ended before rank 1 started"
        match = re.search(r"rank 1 of 2: .*pid (\d+)", line)
        pid = int(match.group(1)) if match else None
    time.sleep(2)  # into the training loop
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0, "a run with a dead rank must not report success"
    assert time.monotonic() - start < 120
    assert "rank: 1" in rest or "exitcode" in rest.lower() or "signal" in rest.lower(), rest[-2000:]


def test_share_splits_every_item_once_in_rank_order():
    from diffcli.distributed import World, share

    for n in (0, 1, 2, 7, 10):
        for size in (1, 2, 3, 4):
            parts = [share(World(r, size), n) for r in range(size)]
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n)), (n, size)
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_sample_and_eval_over_three_processes_equal_one(tiny_run, tmp_path):
    """Image i is the same picture however many processes draw, also when a rank has no
    share (2 images, 3 ranks); eval's numbers come out the same (20 images, uneven shares)."""
    import json

    from typer.testing import CliRunner

    from diffcli.cli import app

    ckpt = tiny_run / "model.safetensors"
    common = ["--ckpt", ckpt, "--steps", "3"]
    # 2 images over 3 ranks: rank 2 has no share (eval below splits 20 images 7, 7, 6)
    three = diffcli("sample", *common, "--label", "circle", "--per-label", "2", "--out", tmp_path / "three.png",
                    "--save-individual", tmp_path / "three", nproc=3)
    assert three.returncode == 0, three.stderr[-3000:]
    one = CliRunner().invoke(app, ["sample", *map(str, common), "--label", "circle", "--n", "2", "--out",
                                   str(tmp_path / "one.png"), "--save-individual", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "three").iterdir()) and len(names) == 2
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "three.png").read_bytes()

    three = diffcli("eval", *common, "--per-label", "2", "--json", nproc=3)
    assert three.returncode == 0, three.stderr[-3000:]
    one = CliRunner().invoke(app, ["eval", *map(str, common), "--n", "2", "--json"])
    assert one.exit_code == 0, one.output
    a, b = json.loads(three.stdout), json.loads(one.stdout)
    assert a.pop("device").endswith("x 3 processes")
    for key in ("sampling_s", "device"):
        a.pop(key, None), b.pop(key, None)
    assert a == b
