"""`--log tensorboard|wandb`, read back with each tracker's own reader, offline."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcli import trackers
from diffcli.cli import app

runner = CliRunner()
TINY = ["train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--batch-size", "8", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def scalars(folder: Path, tag: str) -> list[int]:
    """The steps of `tag` as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)], acc.Tags()


def test_tensorboard_gets_the_metrics_and_grids_and_a_resume_shows_no_step_twice(tmp_path):
    out = tmp_path / "run"
    r = run(*TINY, "--max-steps", "4", "--sample-every", "2", "--log", "tensorboard", "--out", out)
    assert r.exit_code == 0, r.output
    steps, tags = scalars(out / "tensorboard", "train/loss")
    assert steps == [4] and {"train/lr", "train/images_per_s", "train/epoch"} <= set(tags["scalars"])
    assert "samples" in tags["images"] and "config/text_summary" in tags["tensors"]

    # a session killed after its checkpoint at 4 had logged step 5; the resume continues from 4
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as w:
        w.add_scalar("train/loss", 9.0, 5)
    r = run("train", "--out", out, "--resume", "--max-steps", "6")
    assert r.exit_code == 0, r.output
    assert scalars(out / "tensorboard", "train/loss")[0] == [4, 6]

    # eval's figures join the run's board at the model's step
    r = run("eval", "--ckpt", out / "model.safetensors", "--n", "2", "--steps", "2", "--real-n", "50", "--log", "tensorboard",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert scalars(out / "tensorboard", "eval/nn_ratio")[0] == [6]


def test_the_check_for_duplicates_can_fail(tmp_path):
    """Without purge_step the killed session's step 5 stays in the plot."""
    from torch.utils.tensorboard import SummaryWriter

    for step in (4, 5, 6):
        with SummaryWriter(str(tmp_path)) as w:
            w.add_scalar("train/loss", 1.0, step)
    assert scalars(tmp_path, "train/loss")[0] == [4, 5, 6]


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file: W&B's 7-byte
    header, then a LevelDB log (32 KiB blocks of records, each with a 7-byte header of
    checksum, length and type: full, or first/middle/last pieces) of protobuf Records."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_keeps_the_loss_history_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    r = run(*TINY, "--max-steps", "4", "--sample-every", "2", "--log", "wandb", "--wandb-project", "diffcli-test", "--out", out)
    assert r.exit_code == 0, r.output
    run_id = (out / trackers.WANDB_ID_FILE).read_text().strip()
    r = run("train", "--out", out, "--resume", "--max-steps", "6")
    assert r.exit_code == 0, r.output
    sessions = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2, "the resume must continue the same W&B run id"
    first, second = (wandb_history(s) for s in sessions)
    assert [row["_step"] for row in first if "train/loss" in row] == [4]
    assert [row["_step"] for row in second if "train/loss" in row] == [6]
    assert any("samples/path" in row for row in first) and first[-1]["train/images_per_s"] < 1e5


def test_a_missing_tracker_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    r = run(*TINY, "--max-steps", "2", "--log", "tensorboard,wandb", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "pip install 'diffcli[tensorboard]'" in " ".join(r.output.split())
    assert not (tmp_path / "run").exists()
    r = run(*TINY, "--max-steps", "2", "--log", "mlflow", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "train.log must be none, tensorboard, wandb" in " ".join(r.output.split()), r.output


class Broken:
    def __init__(self):
        self.closed = False

    def scalars(self, step, values):
        raise OSError(28, "No space left on device")

    def close(self):
        self.closed = True


def test_a_tracker_that_fails_costs_a_notice_not_the_run():
    notices, broken = [], Broken()
    t = trackers.Trackers({"tensorboard": broken}, notices.append)
    seen = []
    report = t.wrap(lambda event, **info: seen.append(event))
    report("log", step=50, loss=0.1)
    report("log", step=100, loss=0.1)
    assert seen == ["log", "log"] and len(notices) == 1 and "No space left" in notices[0]
    assert broken.closed and not t.writers


def test_the_label_readings_reach_the_trackers_as_scalars_at_their_step():
    class Recording:
        def __init__(self):
            self.got = []

        def scalars(self, step, values):
            self.got.append((step, values))

    writer = Recording()
    report = trackers.Trackers({"tensorboard": writer}, print).wrap(lambda event, **info: None)
    report("labels", step=1000, label_knowledge=0.53, label_gain=0.038)
    report("checkpoint", step=1000, path="model.safetensors")
    assert writer.got == [(1000, {"label_knowledge": 0.53, "label_gain": 0.038})]


@pytest.mark.parametrize("text,names", [("none", []), ("tensorboard", ["tensorboard"]),
                                        ("wandb,tensorboard", ["wandb", "tensorboard"])])
def test_log_names(text, names):
    assert trackers.parse(text) == names
