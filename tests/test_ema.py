"""Post-hoc EMA (ema.py, posthoc.py, `diffcli ema`): the coefficient maths against the
recurrence it stands for, and reconstructions against EMAs tracked during a real run."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffcli import checkpoint, ema, posthoc
from diffcli.cli import app
from diffcli.runs import snapshots

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def recurrence(betas: torch.Tensor) -> torch.Tensor:
    """By brute force: how much of θ_0..θ_T the average holds after each step, [T + 1, T]."""
    w = torch.zeros(len(betas) + 1, dtype=torch.float64)
    w[0] = 1.0
    out = []
    for t, beta in enumerate(betas.tolist(), start=1):
        w = beta * w
        w[t] += 1 - beta
        out.append(w.clone())
    return torch.stack(out, 1)


@pytest.mark.parametrize("betas", [ema.classic_betas(60, 0.9), ema.power_betas(60, 0.1)], ids=["classic", "power"])
def test_coefficients_match_the_recurrence_per_step_and_per_bin(betas):
    exact = recurrence(betas)
    at = torch.tensor([7, 30, 60])
    per_step = ema.coefficients(betas, at, torch.arange(-1, 61))
    assert torch.allclose(per_step, exact[:, at - 1], rtol=1e-10, atol=1e-13)
    edges = torch.tensor([-1, 0, 7, 19, 30, 45, 60])
    binned = ema.coefficients(betas, at, edges)
    expected = torch.stack([exact[a + 1:b + 1, at - 1].sum(0) for a, b in zip(edges[:-1], edges[1:])])
    assert torch.allclose(binned, expected, rtol=1e-10, atol=1e-13)


def test_power_profile_lengths_match_edm2():
    for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):  # EDM2's two profiles (its Table/phema.py)
        assert ema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)
        assert ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    # The relative standard deviation of the ages, measured on the steps, is the closed form's.
    steps = 4000
    w = ema.coefficients(ema.power_betas(steps, 0.1), torch.tensor([steps]), torch.arange(-1, steps + 1))[:, 0]
    age = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    mean = (w * age).sum()
    assert math.sqrt((w * (age - mean) ** 2).sum()) == pytest.approx(0.1, rel=0.01)


def test_classic_ema_length_is_its_window_once_warm():
    # An exponential window of decay d has ages of standard deviation sqrt(d) / (1 - d) steps.
    assert ema.classic_sigma_rel(5000, 0.99) == pytest.approx(math.sqrt(0.99) / 0.01 / 5000, rel=1e-3)


def test_solve_is_exact_with_a_snapshot_every_step_and_improves_with_more():
    steps = 200
    profiles = [ema.power_betas(steps, s) for s in ema.PROFILES]
    x, error = ema.solve(list(range(1, steps + 1)), profiles, ema.classic_betas(steps, 0.97))
    assert error < 1e-8 and x.shape == (steps, 2) and x.sum() == pytest.approx(1.0)
    x, error = ema.solve([100, 200], profiles, ema.power_betas(steps, ema.PROFILES[1]))
    assert error < 1e-9 and torch.allclose(x, torch.tensor([[0, 0], [0, 1.0]], dtype=torch.float64), atol=1e-6)
    errors = [ema.solve(list(range(gap, steps + 1, gap)), profiles, ema.power_betas(steps, 0.08))[1] for gap in (50, 10, 2)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.05, errors


def test_a_run_longer_than_max_bins_is_solved_as_its_steps_one_by_one():
    # Past MAX_BINS steps the fit runs on bins (each row scaled by 1 / sqrt(its size)); its
    # weights and error must be those of the least squares over every step, to a hair.
    total = 2 * ema.MAX_BINS + 999
    snaps = [301, 1003, 2004, 4001, 6003, total - 1, total]
    profiles = [ema.power_betas(total, s) for s in ema.PROFILES]
    target = ema.power_betas(total, 0.15)
    x, error = ema.solve(snaps, profiles, target)
    every = torch.arange(-1, total + 1)
    a = torch.stack([ema.coefficients(b, torch.tensor(snaps), every) for b in profiles], 2).flatten(1)
    b = ema.coefficients(target, torch.tensor([total]), every)
    best = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]

    def residual(w):  # the per-step relative error of weights w, normalised to sum to 1 as solve's are
        return (torch.linalg.vector_norm(a @ (w / w.sum())[:, None] - b) / torch.linalg.vector_norm(b)).item()

    assert 0.01 < error == pytest.approx(residual(x.flatten()), rel=1e-4)
    assert residual(x.flatten()) == pytest.approx(residual(best), rel=1e-4)


def test_reconstructions_match_the_emas_a_resumed_run_tracked(tmp_path, monkeypatch):
    """12 steps, a resume to 24, a snapshot after every step: the run's own EMA, rebuilt
    from the snapshots, equals the model it saved, and `diffcli ema` at a profile's length
    gives that profile as the run tracked it (in train_state), within float tolerance, with
    the run's label reading for the default guidance (measured here on a few images, though a
    run this short could not move the weight by it)."""
    monkeypatch.setattr("diffcli.fitting.knowledge_can_matter", lambda images: True)
    monkeypatch.setattr("diffcli.training.IMAGES", 8)
    monkeypatch.setattr("diffcli.training.GAIN_IMAGES", 8)
    out = tmp_path / "run"
    common = ["--data", "shapes", "--limit", "48", "--image-size", "16", "--preset", "tiny", "--sample-every", "12",
              "--ema-snapshot-every", "1", "--ema-decay", "0.95"]
    assert run("train", *common, "--max-steps", "12", "--out", out).exit_code == 0
    stray = out / posthoc.SNAPSHOT_DIR / "step_0000099.safetensors"  # as a crashed later session would leave
    stray.write_bytes((out / posthoc.SNAPSHOT_DIR / "step_0000012.safetensors").read_bytes())
    r = run("train", "--out", out, "--resume", "--max-steps", "24")
    assert r.exit_code == 0, r.output
    assert sorted(snapshots(out)) == list(range(1, 25)), "the stray snapshot past the checkpoint must go"
    assert json.loads(run("inspect", out, "--json").output)["ema_snapshots"].startswith("24, ")

    model = load_file(str(out / "model.safetensors"))
    [(rebuilt, error)], meta = posthoc.reconstruct(out, [lambda steps: ema.classic_betas(steps, 0.95)])
    assert meta["step"] == 24 and error < 1e-6
    scale = max(v.abs().max().item() for v in model.values())
    assert max((rebuilt[k] - model[k]).abs().max().item() for k in model) < 1e-5 * scale

    state = load_file(str(out / "train_state.safetensors"))
    r = run("ema", "--run", out, "--length", f"{ema.PROFILES[1]}")
    assert r.exit_code == 0, r.output
    made = load_file(str(out / f"ema-{ema.PROFILES[1]:g}.safetensors"))
    tracked = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("profile1.")}
    assert made.keys() == model.keys()
    assert max((made[k] - tracked[k]).abs().max().item() for k in tracked) < 1e-5 * scale
    from diffcli.checkpoint import model_metadata, read_header

    labels = [[model_metadata(read_header(f))[k] for k in ("label_knowledge", "label_gain")]
              for f in (out / "model.safetensors", out / f"ema-{ema.PROFILES[1]:g}.safetensors")]
    assert None not in labels[0] and labels[1] == labels[0]
    assert run("sample", "--ckpt", out / f"ema-{ema.PROFILES[1]:g}.safetensors", "--n", "1", "--steps", "2",
               "--out", tmp_path / "s.png").exit_code == 0


def test_ema_refuses_what_it_cannot_do(tmp_path):
    tiny = ["--data", "shapes", "--limit", "48", "--image-size", "16", "--preset", "tiny"]
    out, other = tmp_path / "plain", tmp_path / "other"
    assert run("train", *tiny, "--max-steps", "2", "--out", out).exit_code == 0
    assert run("train", *tiny, "--max-steps", "2", "--ema-snapshot-every", "1", "--out", other,
               "--config", _wider(tmp_path)).exit_code == 0

    def refused(fragment, *args):
        r = run("ema", *args)
        assert r.exit_code == 1 and "Traceback" not in r.output and fragment in " ".join(r.output.split()), r.output

    refused("holds no EMA snapshots", "--run", out, "--length", "0.1")
    refused(f"is a file; give the run folder that holds it ('{out}')", "--run", out / "model.safetensors", "--length", "0.1")
    refused("--out names one file", "--run", out, "--length", "0.05,0.1", "--out", tmp_path / "one.safetensors")
    refused("must be in (0, 0.28]", "--run", out, "--length", "0.3")
    refused("--length gives 0.1 more than once", "--run", out, "--length", "0.1,0.05,0.10")  # (it said "--out and --out")
    # A snapshot of another network, a damaged one, and the run's own model as --out.
    (out / "ema_snapshots").mkdir()
    (out / "ema_snapshots" / "step_0000001.safetensors").write_bytes((other / "ema_snapshots" / "step_0000001.safetensors").read_bytes())
    refused("does not match the model file", "--run", out, "--length", "0.1")
    (out / "ema_snapshots" / "step_0000001.safetensors").write_bytes(b"\x02" + b"\0" * 7 + b"{}")
    refused("is not a diffcli EMA snapshot", "--run", out, "--length", "0.1")
    cut = (other / "ema_snapshots" / "step_0000002.safetensors").read_bytes()
    (other / "ema_snapshots" / "step_0000002.safetensors").write_bytes(cut[:-100])
    refused("is not a readable safetensors file: it is cut short", "--run", other, "--length", "0.1")
    (other / "ema_snapshots" / "step_0000002.safetensors").write_bytes(cut)
    refused("is the run's model this command reads", "--run", other, "--length", "0.1", "--out", other / "model.safetensors", "--overwrite")
    # a model file under another name: the run's config was once replaced by one under --overwrite
    config = (other / "config.yaml").read_bytes()
    refused("--out must end in .safetensors", "--run", other, "--length", "0.1", "--out", other / "config.yaml", "--overwrite")
    refused("--out must end in .safetensors", "--run", other, "--length", "0.1", "--out", tmp_path / "ema.png")
    assert (other / "config.yaml").read_bytes() == config
    # A model file whose weights are not its own config's network (here: blocks the config asks for are missing).
    mixed = tmp_path / "mixed"
    shutil.copytree(other, mixed)
    meta = checkpoint.model_metadata(checkpoint.read_header(other / "model.safetensors"))
    meta["config"]["model"]["num_res_blocks"] = 2
    checkpoint.save_model(mixed / "model.safetensors", load_file(str(other / "model.safetensors")), meta["config"],
                          meta["class_names"], meta["step"], meta["epoch"])
    refused("does not match its own config: 56 weight(s) missing.", "--run", mixed, "--length", "0.1")

    # A new run in the folder leaves none of the old run's snapshots, or models made from them, behind.
    assert run("ema", "--run", other, "--length", "0.1").exit_code == 0 and (other / "ema-0.1.safetensors").exists()
    assert run("train", *tiny, "--max-steps", "1", "--out", other, "--overwrite").exit_code == 0
    assert snapshots(other) == {} and not (other / "ema-0.1.safetensors").exists()


def _wider(tmp_path):
    """A config whose network differs from the tiny preset's (another run's snapshots)."""
    path = tmp_path / "wider.yaml"
    path.write_text("model:\n  base_channels: 16\n")
    return path
