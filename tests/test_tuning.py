"""`diffcli tune-guidance`: the sweep's stop, the header rewrite that leaves the weights'
bytes alone, and the command as a user runs it, storing a weight the other commands use."""

import json
import shutil
import struct

import pytest
from safetensors.torch import load_file, save
from typer.testing import CliRunner

import torch

from diffcli import runlock, tuning
from diffcli.checkpoint import load_model, model_header, model_metadata, with_metadata
from diffcli.cli import app
from diffcli.errors import UserError
from diffcli.files import sha256

runner = CliRunner()


def _valley(at: float, seen: list):
    def measure(w):
        seen.append(w)
        return {"classifier_fd": (w - at) ** 2}
    return measure


def test_the_sweep_stops_two_past_the_valley_and_always_measures_the_rule():
    seen = []
    rows = tuning.sweep(_valley(1.5, seen), [1, 1.5, 2, 2.5, 3, 3.5], always=[2.7])
    assert seen == [1, 1.5, 2, 2.5, 2.7]  # 3 and 3.5 lie past two worse weights; the rule's 2.7 is measured anyway
    assert tuning.best(rows)["guidance"] == 1.5
    seen.clear()
    rows = tuning.sweep(_valley(4.2, seen), tuning.WEIGHTS, beyond=True)
    assert seen == [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5] and tuning.best(rows)["guidance"] == 4  # past the list, to the valley
    seen.clear()
    tuning.sweep(_valley(4.2, seen), [1, 1.001], always=[3])
    assert seen == [1, 1.001, 3]  # a list given is measured as given
    seen.clear()
    tuning.sweep(_valley(20, seen), [2, 3], beyond=True)
    assert seen == [2, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8]  # in the default weights' step, never past HIGHEST


def test_one_worse_point_does_not_end_the_sweep():
    fds = {1: 5.0, 1.5: 4.0, 2: 4.5, 2.5: 3.0, 3: 3.5, 3.5: 3.8}  # a noisy bump at 2, the valley at 2.5
    rows = tuning.sweep(lambda w: {"classifier_fd": fds[w]}, list(fds))
    assert tuning.best(rows)["guidance"] == 2.5 and [r["guidance"] for r in rows] == [1, 1.5, 2, 2.5, 3, 3.5]


def test_a_nan_score_never_wins():
    rows = [{"guidance": 1, "classifier_fd": float("nan")}, {"guidance": 2, "classifier_fd": 9.0}]
    assert tuning.best(rows)["guidance"] == 2


def test_new_metadata_leaves_every_tensor_byte_as_it_was(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16)}
    data = save(tensors, metadata={"format": "x", "kept": "yes"})
    new = with_metadata(data, {"added": "1.5"})
    (n_old,), (n_new,) = struct.unpack("<Q", data[:8]), struct.unpack("<Q", new[:8])
    assert new[8 + n_new:] == data[8 + n_old:] and n_new % 8 == 0  # the same tensor bytes, still aligned
    (tmp_path / "m.safetensors").write_bytes(new)
    back = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    from safetensors import safe_open
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "x", "kept": "yes", "added": "1.5"}


def test_tune_guidance_stores_the_best_weight_which_sample_then_uses(tiny_run, shapes_classifier, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # (the session's run stays as it was)
    model = run / "model.safetensors"
    before = load_file(model)
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(model), "--classifier", str(shapes_classifier), "--weights", "0,3",
                            "--n", "2", "--steps", "2", "--real-n", "100", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "trained for 2 epoch(s), fewer than the 16" in caplog.text and report["classifier"]["epochs"] == 2  # (the fixture's quick judge)
    rows = {row["guidance"]: row["classifier_fd"] for row in report["rows"]}
    assert report["rule"] == 3 and report["stored"]  # (a 12-step model: the rule's ceiling)
    assert set(rows) == {0, 3}  # the weights given, and no others
    assert report["chosen"] == min(rows, key=rows.get)
    tuned = model_metadata(model_header(model))["tuned_guidance"]
    assert tuned["weight"] == report["chosen"] and tuned["classifier_fd"] == {f"{w:g}": round(v, 5) for w, v in rows.items()}
    after = load_file(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # only the header changed
    assert load_model(model)[0].trained.tuned == report["chosen"]
    drawn = runner.invoke(app, ["sample", "--ckpt", str(model), "--out", str(tmp_path / "s.png"), "--n", "1", "--steps", "2",
                                "--label", "0", "--device", "cpu"])
    assert f"guidance {report['chosen']:g}" in " ".join(drawn.output.split())
    shown = runner.invoke(app, ["inspect", str(model), "--json"])
    assert json.loads(shown.output)["default_guidance"].startswith(f"{report['chosen']:g} (tuned with shapes.safetensors")
    assert not runlock.busy(run)  # the run's lock, taken for the write, is given back


def test_a_model_that_changed_while_measured_is_not_overwritten(tiny_run, tmp_path):
    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", model)
    digest = sha256(model)
    tuning.store(model, digest, {"weight": 1.5})
    assert model_metadata(model_header(model))["tuned_guidance"]["weight"] == 1.5
    newer = with_metadata(model.read_bytes(), {"step": "99"})  # a new checkpoint lands meanwhile
    model.write_bytes(newer)
    with pytest.raises(UserError, match="changed while it was measured"):
        tuning.store(model, digest, {"weight": 3.0})
    assert model.read_bytes() == newer


def test_a_run_still_being_written_is_refused_before_any_sampling(tiny_run, shapes_classifier, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with runlock.holding(run, "diffcli train"):
        r = runner.invoke(app, ["tune-guidance", "--ckpt", str(run / "model.safetensors"), "--classifier", str(shapes_classifier)])
    assert r.exit_code == 1 and "still being written" in r.output and "--no-store" in r.output


def test_a_damaged_tuned_weight_falls_back_to_the_rule(tiny_run, tmp_path, caplog):
    model = tmp_path / "model.safetensors"
    model.write_bytes(with_metadata((tiny_run / "model.safetensors").read_bytes(), {"tuned_guidance": '{"weight": "x"}'}))
    with caplog.at_level("WARNING", logger="diffcli"):
        trained = load_model(model)[0].trained
    assert trained.tuned is None and "damaged" in caplog.text


def test_unconditional_and_distilled_models_have_no_weight_to_tune(tiny_run, shapes_classifier, tmp_path):
    model = tmp_path / "model.safetensors"
    meta = model_metadata(model_header(tiny_run / "model.safetensors"))
    cfg = {**meta["config"], "distill": {"steps": 4, "guidance": 2.0}}
    model.write_bytes(with_metadata((tiny_run / "model.safetensors").read_bytes(), {"config": json.dumps(cfg)}))
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(model), "--classifier", str(shapes_classifier)])
    assert r.exit_code == 1 and "distilled student" in r.output
    model.write_bytes(with_metadata((tiny_run / "model.safetensors").read_bytes(), {"class_names": "[]"}))
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(model), "--classifier", str(shapes_classifier)])
    assert r.exit_code == 1 and "without classes" in r.output


def test_a_read_only_model_is_refused_before_any_sampling_even_for_root(tiny_run, shapes_classifier, tmp_path):
    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", model)
    model.chmod(0o444)  # (root may write it anyway: the mode bits say not to)
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(model), "--classifier", str(shapes_classifier)])
    assert r.exit_code == 1 and "is read-only" in r.output and "--no-store" in r.output


def test_a_full_disk_while_storing_is_one_sentence_and_the_old_file(tiny_run, tmp_path, monkeypatch):
    import errno

    from diffcli import files

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", model)
    before = model.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "atomic_write_bytes", full)
    with pytest.raises(UserError, match="could not write .*No space left"):
        tuning.store(model, sha256(model), {"weight": 1.5})
    assert model.read_bytes() == before


def test_a_model_with_nan_weights_or_a_judge_of_other_classes_is_refused(tiny_run, shapes_classifier, tmp_path):
    from safetensors import safe_open

    from diffcli.classifier import Classifier, ClassifierConfig, save_classifier

    model = tmp_path / "model.safetensors"
    tensors = load_file(tiny_run / "model.safetensors")
    with safe_open(tiny_run / "model.safetensors", "pt") as f:
        meta = f.metadata()
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    model.write_bytes(save(tensors, metadata=meta))
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(model), "--classifier", str(shapes_classifier), "--device", "cpu"])
    assert r.exit_code == 1 and "hold NaN or infinite" in r.output
    other = tmp_path / "other.safetensors"  # the same count of classes, named otherwise
    save_classifier(other, Classifier(ClassifierConfig(3, 32, 10, width=4)), [f"kind{i}" for i in range(10)], "elsewhere",
                    {"test_accuracy": 0.5, "per_class_accuracy": [0.5] * 10, "test_images": 10}, True)
    r = runner.invoke(app, ["tune-guidance", "--ckpt", str(tiny_run / "model.safetensors"), "--classifier", str(other),
                            "--device", "cpu", "--real-n", "10"])
    assert r.exit_code == 1 and "the classifier has the classes kind0" in " ".join(r.output.split()), r.output


def test_a_resume_says_that_the_tuned_weight_goes_with_the_next_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tuning.store(run / "model.safetensors", sha256(run / "model.safetensors"), {"weight": 1.5})
    r = runner.invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "12", "--device", "cpu"])
    assert r.exit_code == 0, r.output  # at its limit already: the same weights are written, and keep their weight
    assert model_metadata(model_header(run / "model.safetensors"))["tuned_guidance"]["weight"] == 1.5
    r = runner.invoke(app, ["train", "--out", str(run), "--resume", "--max-steps", "13", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "tuned guidance weight 1.5 goes with the first checkpoint of new steps" in " ".join(r.output.split())
    assert model_metadata(model_header(run / "model.safetensors"))["tuned_guidance"] is None


def test_a_judge_trained_short_is_told_apart_from_a_full_one_or_an_older_file():
    from diffcli.classifier import ClassifierConfig, classifier_metadata, trained_short

    def meta(**extra):
        header = {"format": "diffcli-classifier", "config": json.dumps({"in_channels": 3, "image_size": 32, "num_classes": 2,
                                                                        "arch": "resnet"}),
                  "class_names": "[\"a\", \"b\"]", "test_accuracy": "0.9", "per_class_accuracy": "[0.9, 0.9]",
                  "test_images": "10", **extra}
        return classifier_metadata({"__metadata__": header})
    assert isinstance(meta()["config"], ClassifierConfig)
    assert trained_short(meta(epochs="1.0")) == 16  # (the ResNet's default)
    assert trained_short(meta(epochs="16.0")) is None and trained_short(meta(epochs="40.0")) is None
    assert trained_short(meta()) is None  # a file from before the epochs were kept says nothing
    for odd in ("nan", "inf", "-1", "0", "abc", ""):  # it only feeds a warning: an odd value is as if absent, never damage
        assert meta(epochs=odd)["epochs"] is None
    grey = meta(epochs="3.0", config=json.dumps({"in_channels": 1, "image_size": 28, "num_classes": 2, "arch": "cnn"}))
    assert trained_short(grey) == 10
