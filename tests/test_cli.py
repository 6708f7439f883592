"""The CLI as a user runs it: in-process with CliRunner and as a real subprocess."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcli.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def assert_one_sentence_error(result, fragment):
    assert result.exit_code == 1, (result.exit_code, result.output)
    text = result.output  # CliRunner mixes stderr in
    assert "Traceback" not in text
    assert fragment in " ".join(text.split()), text
    assert "error:" in text


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, diffcli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "cli.py imports torch at start-up"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffcli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "train" in proc.stdout and "noise-preview" in proc.stdout
    assert elapsed < 1.5, f"python -m diffcli --help took {elapsed:.2f} s"


def test_train_sample_inspect_end_to_end_in_process(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "6", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert "preset tiny" in r.output and "preset: tiny" in (out / "config.yaml").read_text()  # the start line names it

    grid = tmp_path / "all.png"
    r = run("sample", "--ckpt", out / "model.safetensors", "--label", "all", "--n", "3", "--steps", "4", "--out", grid,
            "--save-individual", tmp_path / "each")
    assert r.exit_code == 0, r.output
    img = Image.open(grid)
    # 10 rows (one per class) x 3 columns of 32 px cells with 2 px padding
    assert img.size == (3 * 34 + 2, 10 * 34 + 2)
    assert len(list((tmp_path / "each").glob("*.png"))) == 30

    r = run("sample", "--ckpt", out / "model.safetensors", "--label", "star", "--n", "4", "--sampler", "dpm++",
            "--steps", "3", "--out", tmp_path / "star.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "star.png").size == (2 * 34 + 2, 2 * 34 + 2)

    r = run("inspect", out / "model.safetensors", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["training_step"] == 6 and info["timesteps"] == 1000 and info["classes"][5] == "star"
    assert info["default_guidance"] == "3 (for 96 training images)"  # few images: the ceiling, knowledge not measured
    assert info["image_size"] == 32 and info["channels"] == 3 and info["parameters"] > 1000

    # The run folder refuses a second run unless asked.
    r = run("train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "2", "--out", out)
    assert_one_sentence_error(r, "already holds a run")

    # --config repeats a run from its config.yaml
    r = run("train", "--config", out / "config.yaml", "--out", tmp_path / "again", "--max-steps", "6")
    assert r.exit_code == 0, r.output


def test_resume_continues_to_the_new_limit(tmp_path, monkeypatch):
    """... and picks up the label knowledge last measured (fitting._checkpoint), which the
    model file and the training state both carry, and inspect shows beside the weight.
    (A run this short is at the ceiling whatever the knowledge, so training would skip it.)"""
    import torch

    monkeypatch.setattr("diffcli.fitting.knowledge_can_matter", lambda images: True)
    from diffcli.checkpoint import model_metadata, read_header
    from diffcli.runs import run_config
    from diffcli.trainstate import TrainState

    out = tmp_path / "run"
    assert run("train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "4", "--out", out).exit_code == 0
    saved = [[model_metadata(read_header(out / f))[k] for k in ("label_knowledge", "label_gain")]
             for f in ("model.safetensors", "train_state.safetensors")]
    state = TrainState.create(run_config(out), torch.device("cpu"), torch.contiguous_format)
    state.load(out)
    assert 0 <= state.labels.knowledge <= 1 and -1 < state.labels.gain < 1
    assert saved == [pytest.approx(list(state.labels), abs=1e-4)] * 2
    shown = json.loads(run("inspect", out / "model.safetensors", "--json").output)["default_guidance"]
    assert re.fullmatch(r"3 \(for 64 training images, label knowledge [01]\.\d\d, label gain -?0\.\d\d\d\)", shown), shown
    r = run("train", "--out", out, "--resume", "--max-steps", "8")
    assert r.exit_code == 0, r.output
    assert model_metadata(read_header(out / "model.safetensors"))["step"] == 8
    # each reading is a metrics line of its own, which the loss curve and inspect's last loss pass over
    from diffcli.plots import read_metrics

    readings = [r for r in read_metrics(out / "metrics.jsonl") if "label_knowledge" in r]
    assert [r["step"] for r in readings] == [4, 8] and readings[0]["label_gain"] == pytest.approx(state.labels.gain, abs=1e-4)
    info = json.loads(run("inspect", out, "--json").output)
    assert info["last_step"] == 8 and re.fullmatch(r"4: [01]\.\d\d / -?0\.\d{3}, 8: .*", info["label_readings"])
    assert (out / "loss.png").exists()


@pytest.mark.parametrize("precision", ["auto", "bf16"])  # bf16 on the CPU also trains in the contiguous layout
def test_resume_is_exact_on_cpu(tmp_path, precision, monkeypatch):
    """4 steps, then 4 more after a resume, equals 8 steps in one go (weights, EMA, RNG, data order),
    with the label knowledge measured at every checkpoint (on 8 images, to stay cheap): the
    measurement draws from its own generator, never training's."""
    from safetensors.torch import load_file

    monkeypatch.setattr("diffcli.fitting.knowledge_can_matter", lambda images: True)
    monkeypatch.setattr("diffcli.training.IMAGES", 8)
    monkeypatch.setattr("diffcli.training.GAIN_IMAGES", 16)
    common = ["--data", "shapes", "--limit", "64", "--preset", "tiny", "--sample-every", "4", "--precision", precision]
    assert run("train", *common, "--max-steps", "8", "--out", tmp_path / "straight").exit_code == 0
    assert run("train", *common, "--max-steps", "4", "--out", tmp_path / "split").exit_code == 0
    assert run("train", "--out", tmp_path / "split", "--resume", "--max-steps", "8").exit_code == 0
    a = load_file(str(tmp_path / "straight" / "train_state.safetensors"))
    b = load_file(str(tmp_path / "split" / "train_state.safetensors"))
    from diffcli.checkpoint import model_metadata, read_header

    known = [[model_metadata(read_header(tmp_path / r / "model.safetensors"))[k] for k in ("label_knowledge", "label_gain")]
             for r in ("straight", "split")]
    assert None not in known[0] and known[0] == known[1]
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_sample_errors_are_one_sentence(tiny_run, tmp_path):
    ckpt = tiny_run / "model.safetensors"
    assert_one_sentence_error(run("sample", "--ckpt", tmp_path / "missing.safetensors"), "does not exist")
    assert_one_sentence_error(run("sample", "--ckpt", tiny_run), "is a folder")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--label", "10"), "out of range")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--label", "dragon"), "unknown class 'dragon'")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--steps", "0"), "--steps must be between 1 and T=1000")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--steps", "1001"), "--steps must be between 1 and T=1000")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--n", "0"), "--n must be at least 1")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--guidance", "-1"), "--guidance must be 0 or more")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--sampler", "lms"), "unknown sampler")
    assert_one_sentence_error(run("sample", "--ckpt", ckpt, "--sampler", "ddpm", "--steps", "10"), "ddpm runs all")
    pt = tmp_path / "model.pt"
    import torch

    torch.save({"x": torch.zeros(1)}, pt)
    assert_one_sentence_error(run("sample", "--ckpt", pt), "never unpickles")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_one_sentence_error(run("sample", "--ckpt", empty), "not a readable safetensors")


def test_train_errors_are_one_sentence(tmp_path):
    assert_one_sentence_error(run("train", "--data", tmp_path / "nope", "--out", tmp_path / "o"), "neither a dataset name")
    assert_one_sentence_error(run("train", "--data", "Fashion-MNIST", "--out", tmp_path / "o"), "did you mean 'fashion-mnist'?")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bach_size: 3\n")
    assert_one_sentence_error(run("train", "--config", bad, "--out", tmp_path / "o"), "train.bach_size")
    assert_one_sentence_error(run("train", "--out", tmp_path / "o", "--resume"), "cannot resume")
    assert_one_sentence_error(run("train", "--lr", "-1", "--out", tmp_path / "o"), "train.lr must be positive")
    assert_one_sentence_error(run("train", "--precision", "fp16", "--out", tmp_path / "o"), "train.precision must be auto, fp32 or bf16")


def make_picture(path, mode="RGB", size=(40, 30)):
    Image.new(mode, size, color=100 if mode in ("L", "P") else (200, 30, 30)).save(path)
    return path


def test_noise_preview(tmp_path):
    src = make_picture(tmp_path / "in.png", "RGBA")
    out = tmp_path / "p.png"
    r = run("noise-preview", src, "--out", out, "--frames", "5", "--image-size", "32")
    assert r.exit_code == 0, r.output
    strip = Image.open(out)
    # 5 frames of 96 px (32 px scaled 3x for legible captions) with 2 px gaps and padding,
    # a two-line caption band of 26 px under each frame, a one-line band of 14 px under the row
    row_height = 96 + 26 + 2 * 2 + 14
    assert strip.size == (5 * 96 + 6 * 2, row_height)
    r = run("noise-preview", src, "--out", tmp_path / "all.png", "--schedule", "all", "--steps", "0,500,999", "--image-size", "32")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "all.png").size == (3 * 96 + 4 * 2, 2 * row_height)


@pytest.mark.parametrize("mode", ["L", "P", "RGB"])
def test_noise_preview_accepts_image_modes(tmp_path, mode):
    src = make_picture(tmp_path / "in.png", mode)
    assert run("noise-preview", src, "--out", tmp_path / "p.png", "--frames", "2").exit_code == 0


def test_noise_preview_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("I am text")
    assert_one_sentence_error(run("noise-preview", text), "not an image")
    assert_one_sentence_error(run("noise-preview", tmp_path / "missing.png"), "does not exist")
    src = make_picture(tmp_path / "in.png")
    assert_one_sentence_error(run("noise-preview", src, "--steps", "0,1000"), "--steps must lie in 0..999")
    assert_one_sentence_error(run("noise-preview", src, "--schedule", "sigmoid"), "unknown schedule")


def test_real_subprocess_sample_and_inspect(tiny_run, tmp_path):
    exe = Path(sys.executable).parent / "diffcli"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffcli"]
    ckpt = tiny_run / "model.safetensors"
    proc = subprocess.run(cmd + ["sample", "--ckpt", str(ckpt), "--label", "3", "--n", "4", "--sampler", "ddim", "--steps", "3",
                                 "--out", str(tmp_path / "three.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout
    proc = subprocess.run(cmd + ["inspect", str(ckpt)], capture_output=True, text=True)
    assert proc.returncode == 0 and "cosine" in proc.stdout
    proc = subprocess.run(cmd + ["sample", "--ckpt", str(tmp_path / "nope.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_resume_from_another_folder_with_a_relative_data_root(mnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(mnist_root.parent)  # mnist_root is tmp_path / "data"
    r = run("train", "--data", "mnist", "--data-root", "data", "--limit", "64", "--preset", "tiny", "--max-steps", "2", "--out", "run")
    assert r.exit_code == 0, r.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = run("train", "--out", tmp_path / "run", "--resume", "--max-steps", "4")
    assert r.exit_code == 0, r.output


def test_resume_survives_a_metrics_line_cut_short_by_a_kill(tmp_path):
    out = tmp_path / "run"
    assert run("train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "4", "--out", out).exit_code == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # what a SIGKILL mid-write leaves
    r = run("train", "--out", out, "--resume", "--max-steps", "6")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [4, 6]
    # Lines edited or damaged past use: inspect and a resume skip them (each was a traceback),
    # and a resume keeps those it cannot place, as they were.
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "loss": 0.1}\n{"step": 6, "loss": "x", "lr": 1, "images_per_s": 1, "elapsed_s": 1}\n'
                b'{"step": "6", "label_knowledge": 0.5}\n[6]\n\xff\xfe\x00 damaged\n')
    r = run("inspect", out)
    assert r.exit_code == 0 and "last loss" in r.output, r.output
    r = run("train", "--out", out, "--resume", "--max-steps", "8")
    assert r.exit_code == 0, r.output
    assert run("inspect", out).exit_code == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [4, 6, 6, 6, "6", 8]


@pytest.mark.parametrize("sampler_args,spec_args", [
    (["--sampler", "dpm++", "--steps", "4", "--guidance", "1.5"], ("dpm++", 4, 1.5)),
    (["--sampler", "ddim", "--steps", "3", "--eta", "1", "--no-clip"], ("ddim", 3, None, 1.0, "beta_tilde", False)),
    (["--steps", "3", "--guidance", "2", "--guidance-interval", "0.5,inf"], ("ddim", 3, 2.0, 0.0, "beta_tilde", True, "trailing", (0.5, float("inf")))),
])
def test_cli_sample_makes_the_pixels_of_the_core_call(tiny_run, tmp_path, sampler_args, spec_args):
    """The command layer adds nothing to the pictures: the same seeds, labels and settings
    through `diffcli sample` and through `generate` give the same bytes."""
    import numpy as np
    import torch

    from diffcli.checkpoint import load_model
    from diffcli.generate import generate
    from diffcli.objective import of
    from diffcli.spec import SamplerSpec

    ckpt = tiny_run / "model.safetensors"
    r = run("sample", "--ckpt", ckpt, "--label", "1,star", "--n", "3", "--seed", "5", "--batch-size", "2", *sampler_args,
            "--out", tmp_path / "grid.png", "--save-individual", tmp_path / "each", "--device", "cpu")
    assert r.exit_code == 0, r.output
    model, cfg, _ = load_model(ckpt)
    expected = generate(model, of(cfg.diffusion),
                        SamplerSpec(*spec_args), labels=[1, 1, 1, 5, 5, 5], seeds=list(range(5, 11)))
    files = sorted((tmp_path / "each").glob("*.png"))
    assert [f.name.split("_seed")[1] for f in files] == [f"{s}.png" for s in range(5, 11)]
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    assert torch.equal(got, expected)


def test_sample_guides_by_the_models_training_unless_told(tiny_run, tmp_path):
    """No --guidance: the weight spec.default_guidance gives for the images the model has
    seen (the tiny run's 12 steps of 16: the ceiling), the same bytes as asking for it; a
    --guidance-interval that holds no step is the plain conditional model."""
    from diffcli.spec import GUIDANCE_CEILING

    def draw(name, *args):
        r = run("sample", "--ckpt", tiny_run / "model.safetensors", "--label", "all", "--n", "2", "--steps", "3", *args,
                "--out", tmp_path / name, "--device", "cpu")
        assert r.exit_code == 0, r.output
        return (tmp_path / name).read_bytes(), r.output

    auto, said = draw("auto.png")
    assert f"guidance {GUIDANCE_CEILING:g}" in said
    assert auto == draw("ceiling.png", "--guidance", f"{GUIDANCE_CEILING:g}")[0]
    assert auto != draw("two.png", "--guidance", "2")[0]
    assert draw("never.png", "--guidance", "3", "--guidance-interval", "1e30,inf")[0] == draw("plain.png", "--guidance", "1")[0]
    for bad in ("1,2,3", "3,1"):
        r = run("sample", "--ckpt", tiny_run / "model.safetensors", "--guidance-interval", bad, "--out", tmp_path / "x.png")
        assert r.exit_code == 1 and "--guidance-interval" in r.output and "Traceback" not in r.output
