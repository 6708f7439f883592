"""The last rough edges a careful new user met (issue 35, parts 5 and 6): each refusal one
sentence that names the right thing, and a long command neither silent nor noisy."""

import json
import shutil
import struct
import sys
import warnings
import zlib

import pytest
import torch
from typer.testing import CliRunner

from diffcli.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())


def png_header(path, width, height):
    """A PNG whose header claims width x height (PIL reads the size without decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9_000, 20_000])  # past PIL's warning (89M), past its refusal (179M)
def test_a_huge_image_gets_the_tools_own_sentence_and_no_pil_warning(tmp_path, side):
    image = png_header(tmp_path / "big.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = cli("noise-preview", image, "--out", tmp_path / "o.png")
    assert r.exit_code == 1 and f"too many pixels ({side}x{side}" in said(r), said(r)
    assert not [w for w in caught if "DecompressionBomb" in str(w.category)] and "DecompressionBomb" not in r.output


def test_the_option_a_bad_label_came_from_is_named(tiny_run, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    r = cli("edit", image, "--ckpt", tiny_run / "model.safetensors", "--label", "0", "--invert", "--source-label", "99")
    assert r.exit_code == 1 and "--source-label 99 is out of range" in said(r), said(r)


def test_seeds_that_are_not_whole_numbers_say_so(tiny_run):
    r = cli("interpolate", "--ckpt", tiny_run / "model.safetensors", "--seeds", "a,b")
    assert r.exit_code == 1 and "--seeds must be a comma-separated list of whole numbers" in said(r), said(r)
    for option, text in (("--steps", "4,,5"), ("--guidance", "1,2,")):  # a value left out is not read as fewer values
        r = cli("compare", "--ckpt", tiny_run / "model.safetensors", option, text)
        assert r.exit_code == 1 and f"{option} has an empty item in '{text}'" in said(r), said(r)


def test_diffcli_s_other_files_are_told_apart_from_models(tiny_run, tmp_path):
    """inspect says what a training state and an EMA snapshot are; commands that want a
    model say what was given instead, not 'not written by diffcli' or 'missing weights'."""
    from diffcli import checkpoint
    import torch

    state = tiny_run / "train_state.safetensors"
    snap = tmp_path / "snap.safetensors"
    checkpoint.save_tensors(snap, {"0.w": torch.zeros(2)}, {"format": checkpoint.SNAPSHOT_FORMAT, "step": "12",
                                                            "sigma_rels": json.dumps([0.05, 0.1])})
    info = json.loads(cli("inspect", state, "--json").output)
    assert info["kind"].startswith("training state") and "--resume" in info["use"] and info["training_step"] == 12
    assert info["parameters"] == json.loads(cli("inspect", tiny_run / "model.safetensors", "--json").output)["parameters"]
    info = json.loads(cli("inspect", snap, "--json").output)
    assert info["kind"].startswith("EMA snapshot") and info["ema_lengths"] == [0.05, 0.1] and "diffcli ema" in info["use"]
    for args in (("export", "--ckpt", state, "--out", tmp_path / "e"), ("sample", "--ckpt", state, "--out", tmp_path / "s.png")):
        r = cli(*args)
        assert r.exit_code == 1 and "is a run's training state" in said(r) and "model.safetensors beside it" in said(r), said(r)
    r = cli("sample", "--ckpt", snap, "--out", tmp_path / "s.png")
    assert r.exit_code == 1 and "is an EMA snapshot of a run, not a model" in said(r), said(r)
    r = cli("distill", "--teacher", state, "--out", tmp_path / "d")
    assert r.exit_code == 1 and "is a run's training state" in said(r), said(r)
    # and the other way round: a model copied over a run's training state, then --resume
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(run / "model.safetensors", run / "train_state.safetensors")
    r = cli("train", "--resume", "--out", run, "--max-steps", "13")
    assert r.exit_code == 1 and "is a model, not the training state" in said(r), said(r)


def test_cifar10_without_its_files_names_a_folder_to_pass(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr(tvd, "CIFAR10", offline)
    r = cli("train", "--data", "cifar10", "--data-root", tmp_path, "--max-steps", "1", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "could not be downloaded" in said(r), said(r)
    assert "holding )" not in said(r) and "holding .)" not in said(r) and "pass --data-root to the folder holding it" in said(r)
    # The files there, but damaged: torchvision finds them wrong and tries to download (it said "is not in")
    monkeypatch.setattr(tvd, "MNIST", offline)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / "MNIST" / "raw" / name).write_bytes(b"\x1f\x8b cut short")
    r = cli("train", "--data", "mnist", "--data-root", tmp_path, "--max-steps", "1", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "are not the official files (damaged, cut short, or another release)" in said(r), said(r)
    # A data root that is not there: the failure leaves no empty folders (it left new/MNIST/raw); one that is a file
    r = cli("train", "--data", "mnist", "--data-root", tmp_path / "new", "--max-steps", "1", "--out", tmp_path / "run2")
    assert r.exit_code == 1 and "is not in" in said(r) and not (tmp_path / "new").exists(), said(r)
    r = cli("train", "--data", "mnist", "--data-root", tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz",
            "--max-steps", "1", "--out", tmp_path / "run3")
    assert r.exit_code == 1 and "is a file; give a folder" in said(r), said(r)


def test_help_names_the_extras_in_full():
    r = cli("train", "--help")
    assert "'diffcli[tensorboard]'" in said(r), said(r)  # rich markup once read it as a style and dropped it


def test_a_time_budget_is_counted_as_times_not_seconds():
    from rich.progress import Progress

    from diffcli.cli._progress import Count

    with Progress(Count(), auto_refresh=False) as bar:
        timed = bar.add_task("train", total=180, completed=133, by_time=True)
        counted = bar.add_task("train", total=5000, completed=1234)
        long = bar.add_task("train", total=7200, completed=3725, by_time=True)
        assert [str(Count().render(bar.tasks[t])) for t in (timed, counted, long)] == ["2:13/3:00", "1234/5000", "1:02:05/2:00:00"]


def test_training_without_matplotlib_says_nothing_about_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli("train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "matplotlib" not in r.output and "plots" not in r.output and not (tmp_path / "run" / "loss.png").exists()


def test_edit_refuses_a_bad_output_before_it_samples_anything(tiny_run, tmp_path):
    """--save-individual naming a file, or --out with no image extension, is refused at once:
    no sheet is written first (it used to be, after all the sampling)."""
    from PIL import Image

    image, taken = tmp_path / "x.png", tmp_path / "taken.txt"
    Image.new("RGB", (8, 8)).save(image)
    taken.write_text("mine")
    r = cli("edit", image, "--ckpt", tiny_run / "model.safetensors", "--label", "0", "--out", tmp_path / "sheet.png",
            "--save-individual", taken)
    assert r.exit_code == 1 and "--save-individual" in said(r) and "is a file; give a folder" in said(r), said(r)
    assert not (tmp_path / "sheet.png").exists() and taken.read_text() == "mine"
    r = cli("edit", image, "--ckpt", tiny_run / "model.safetensors", "--label", "0", "--out", tmp_path / "sheet.xyz")
    assert r.exit_code == 1 and "--out must end in an image extension" in said(r), said(r)


def test_resume_names_the_options_it_does_not_use(tiny_run, tmp_path, caplog):
    """--resume continues the run's recipe; a different --lr or --preset given with it was
    dropped without a word. The same values, or a new stopping point, say nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = cli("train", "--resume", "--out", run, "--max-steps", "13", "--data", "shapes", "--lr", "1e-2", "--preset", "small")
    assert r.exit_code == 0, said(r)
    assert "recipe, so --lr, --preset given here are not used" in caplog.text  # (the run's own --data, given again, is not named)
    caplog.clear()
    assert cli("train", "--resume", "--out", run, "--max-steps", "14", "--data", "shapes").exit_code == 0
    assert "recipe" not in caplog.text
    # --data-root says where the data is now, not the recipe: taken and stored (a run that found its data
    # through DIFFCLI_DATA_ROOT could not be resumed without it, and the warning called it --root)
    assert cli("train", "--resume", "--out", run, "--max-steps", "15", "--data-root", tmp_path / "moved").exit_code == 0
    assert "recipe" not in caplog.text and f"root: {tmp_path / 'moved'}" in (run / "config.yaml").read_text()


def test_a_model_with_nan_weights_says_its_pictures_are_black(tiny_run, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from diffcli.checkpoint import read_header

    broken = tmp_path / "nan.safetensors"
    weights = load_file(str(tiny_run / "model.safetensors"))
    weights["conv_out.weight"] = torch.full_like(weights["conv_out.weight"], float("nan"))
    save_file(weights, str(broken), metadata=read_header(tiny_run / "model.safetensors")["__metadata__"])
    r = cli("sample", "--ckpt", broken, "--n", "2", "--label", "0", "--steps", "2", "--out", tmp_path / "s.png")
    assert r.exit_code == 0 and "2 of 2 images hold NaN or infinite values (drawn black)" in caplog.text, said(r)


def test_resume_with_the_runs_folder_given_again_relative_says_nothing(tmp_path, monkeypatch, caplog):
    """config.yaml stores the data path absolute; the same folder given as the user first
    wrote it (relative, from its own working folder) is the run's own value."""
    from PIL import Image

    for k, cls in enumerate(("a", "b")):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (200 * k, 40 * i, 0)).save(tmp_path / "pics" / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    tiny = ["--data", "pics", "--preset", "tiny", "--out", "run"]
    assert cli("train", *tiny, "--max-steps", "1").exit_code == 0
    assert cli("train", *tiny, "--max-steps", "2", "--resume").exit_code == 0
    assert "recipe" not in caplog.text
    # A renamed class folder renumbers the classes (b is now class 0): refused, not relabelled.
    (tmp_path / "pics" / "a").rename(tmp_path / "pics" / "zebra")
    before = (tmp_path / "run" / "train_state.safetensors").read_bytes()
    r = cli("train", *tiny, "--max-steps", "3", "--resume")
    assert r.exit_code == 1 and "the run learned the classes a, b, and the data now has b, zebra" in " ".join(r.output.split()), said(r)
    assert (tmp_path / "run" / "train_state.safetensors").read_bytes() == before


def test_eval_against_another_sets_classes_warns(tiny_run, tmp_path, caplog):
    from PIL import Image

    for k, cls in enumerate(("a", "b")):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(10):  # (a tenth of them held out as the reference: at least 2)
            Image.new("RGB", (32, 32), (90 * k, 20 * i, 9)).save(tmp_path / "pics" / cls / f"{i}.png")
    r = cli("eval", "--ckpt", tiny_run / "model.safetensors", "--data", tmp_path / "pics", "--n", "2", "--steps", "1")
    assert r.exit_code == 0, said(r)
    assert "has the classes a, b, and the model circle, square" in " ".join(caplog.text.split())


def test_printed_paths_are_whole_and_quoted_where_they_hold_a_space(tmp_path):
    """Piped output broke lines at 80 columns inside paths, and a `next:` command with a
    space in its path could not be pasted."""
    out = tmp_path / ("a folder name long enough to pass eighty columns on its own" + "x" * 30) / "run"
    r = cli("train", "--data", "shapes", "--limit", "32", "--preset", "tiny", "--max-steps", "1", "--out", out)
    assert r.exit_code == 0, said(r)
    assert f"model: {out / 'model.safetensors'}\n" in r.output, r.output
    assert f"next: diffcli sample --ckpt '{out / 'model.safetensors'}' --label all" in r.output, r.output


def test_a_piped_warning_is_one_line(tmp_path):
    """Piped, rich laid a warning out at 80 columns and broke a long file name in two."""
    import subprocess
    import sys

    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "pics" / cls / f"{i}.png")
    name = "a-broken-file-whose-name-alone-runs-past-eighty-columns-of-a-log-" + "x" * 20 + ".png"
    (tmp_path / "pics" / "a" / name).write_bytes(b"not a picture")
    proc = subprocess.run([sys.executable, "-m", "diffcli", "train", "--data", str(tmp_path / "pics"), "--preset", "tiny",
                           "--max-steps", "1", "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"WARNING  skipping a/{name}: it is not an image" in proc.stderr, proc.stderr
