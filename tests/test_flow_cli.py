"""A flow model through every command, as a user runs them: train (a real subprocess), resume,
inspect, sample with each sampler, edit (image-to-image, inpainting, inversion), interpolate,
ema, distill, and export -> import. A tiny model on 200 shapes: the checks are that each
command runs the flow objective, not that the pictures are good."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli.checkpoint import load_model
from diffcli.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "run"
    config = out.parent / "groups.yaml"  # one GroupNorm count throughout, as diffusers' UNet2DModel has: it exports
    config.write_text("model:\n  norm_groups: 2\n")
    cmd = [sys.executable, "-m", "diffcli", "train", "--data", "shapes", "--limit", "200", "--preset", "tiny", "--config", str(config),
           "--objective", "flow", "--time-sampling", "uniform", "--max-steps", "8", "--ema-snapshot-every", "4",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "flow matching (velocity), uniform times" in " ".join(proc.stdout.split())
    return out


def test_a_flow_run_resumes_and_says_what_it_learned(flow_run):
    text = run("train", "--out", flow_run, "--resume", "--max-steps", "10")
    assert "flow matching" in text and "done: 10 steps" in text
    model, cfg, _ = load_model(flow_run / "model.safetensors")
    assert (cfg.diffusion.objective, cfg.diffusion.time_sampling) == ("flow", "uniform")
    assert "flow matching" in run("inspect", flow_run / "model.safetensors")


def test_every_sampler_runs_a_flow_model_and_euler_is_ddim(flow_run, tmp_path):
    ckpt = flow_run / "model.safetensors"
    for sampler in ("euler", "ddim", "heun", "dpm++"):
        run("sample", "--ckpt", ckpt, "--label", "0,3", "--n", "2", "--sampler", sampler, "--steps", "4", "--out", tmp_path / f"{sampler}.png")
    assert np.array_equal(pixels(tmp_path / "euler.png"), pixels(tmp_path / "ddim.png"))
    assert not np.array_equal(pixels(tmp_path / "euler.png"), pixels(tmp_path / "heun.png"))
    text = run("sample", "--ckpt", ckpt, "--label", "0,3", "--n", "2", "--sampler", "euler", "--steps", "4", "--shift", "3",
               "--out", tmp_path / "shifted.png")
    assert "shift 3" in text and not np.array_equal(pixels(tmp_path / "euler.png"), pixels(tmp_path / "shifted.png"))


def test_edit_and_interpolate_run_a_flow_model(flow_run, tmp_path):
    ckpt = flow_run / "model.safetensors"
    picture = tmp_path / "in.png"
    Image.fromarray(pixels(flow_run / "samples" / "latest.png")[:32, :32]).save(picture)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.kron(np.array([[0, 255]], dtype=np.uint8), np.ones((32, 16), dtype=np.uint8))).save(mask)
    run("edit", picture, "--ckpt", ckpt, "--label", "1", "--steps", "4", "--n", "1", "--out", tmp_path / "i2i.png")
    run("edit", picture, "--ckpt", ckpt, "--label", "1", "--mask", mask, "--jumps", "1", "--steps", "4", "--n", "1",
        "--out", tmp_path / "inpaint.png")
    run("edit", picture, "--ckpt", ckpt, "--label", "1", "--invert", "--sampler", "euler", "--steps", "4", "--out", tmp_path / "inv.png")
    run("interpolate", "--ckpt", ckpt, "--label", "0", "--seeds", "0,1", "--frames", "3", "--steps", "4", "--out", tmp_path / "seeds.png")
    run("interpolate", "--ckpt", ckpt, "--label", "0,1", "--seeds", "0", "--frames", "3", "--steps", "4", "--out", tmp_path / "labels.png")
    for name in ("i2i", "inpaint", "inv", "seeds", "labels"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_ema_distill_and_the_diffusers_round_trip_keep_the_objective(flow_run, tmp_path):
    run("ema", "--run", flow_run, "--length", "0.1", "--out", tmp_path / "ema.safetensors")
    assert load_model(tmp_path / "ema.safetensors")[1].diffusion.objective == "flow"
    run("distill", "--teacher", flow_run / "model.safetensors", "--steps", "2", "--max-steps", "2", "--out", tmp_path / "student")
    student = tmp_path / "student" / "model.safetensors"
    assert load_model(student)[1].diffusion.objective == "flow"
    run("sample", "--ckpt", student, "--label", "0", "--n", "2", "--out", tmp_path / "student.png")
    run("export", "--ckpt", flow_run / "model.safetensors", "--out", tmp_path / "hub")
    assert "FlowMatchEulerDiscreteScheduler" in (tmp_path / "hub" / "scheduler" / "scheduler_config.json").read_text()
    run("import", tmp_path / "hub", "--out", tmp_path / "back.safetensors")
    ours, _, _ = load_model(flow_run / "model.safetensors")
    back, back_cfg, _ = load_model(tmp_path / "back.safetensors")
    assert back_cfg.diffusion.objective == "flow"
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 730.5]), torch.tensor([0, 10])
    with torch.no_grad():
        assert (back(x, t, y) - ours(x, t, y)).abs().max() < 1e-4
