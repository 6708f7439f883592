"""Distillation: the maths on the analytic Gaussian oracle, then `diffcli distill` as a user runs it."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from diffcli import distill, samplers
from diffcli.cli import app
from diffcli.objective import Objective
from diffcli.schedules import eps_from_x0, make_schedule
from test_samplers import MU, oracle

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_sentence_error(result, fragment):
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in text and fragment in text, (result.exit_code, result.output)


def test_ddim_x0_for_inverts_a_ddim_step():
    """The target is the x̂0 that one DDIM step needs: feed it back and the step lands on x_s."""
    schedule = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x_t, x0 = (torch.randn(16, 3, generator=g) for _ in range(2))
    for t, s in ((999, 749), (500, 3), (249, -1)):
        eps = eps_from_x0(x_t, x0, schedule.alphas_cumprod[t])  # the ε that x0 implies at x_t, as `predict` makes it
        x_s = samplers.ddim_step(schedule, x_t, t, s, eps, x0)
        assert torch.allclose(samplers.ddim_x0_for(schedule, x_t, x_s, t, s), x0, atol=1e-4)


def test_the_teachers_path_passes_through_every_student_timestep():
    student, fine = distill.plan(1000, 4, 32)
    assert student == [999, 749, 499, 249] and len(fine) == 32 and fine[0] == 999
    assert all(t in fine for t in student) and fine == sorted(set(fine), reverse=True)
    assert distill.plan(10, 4, 32)[1] == list(range(9, -1, -1))  # short intervals: each timestep once


class AffineStudent(torch.nn.Module):
    """v = a_k x + b_{k,y} at the k-th student timestep: the teacher's exact map from one of
    them to the next is affine for Gaussian data, so this family can match it exactly."""

    def __init__(self, ts, classes):
        super().__init__()
        self.index = {t: k for k, t in enumerate(ts)}
        self.a = torch.nn.Parameter(torch.zeros(len(ts)))
        self.b = torch.nn.Parameter(torch.zeros(len(ts), classes, 2))

    def forward(self, x, t, y):
        k = torch.tensor([self.index[int(v)] for v in t])
        return self.a[k, None] * x + self.b[k, y]


def distilled_gap(steps: int) -> float:
    """Distil the exact denoiser (its 32-step DDIM path) into `steps` steps with the code
    `diffcli distill` runs; the largest gap between their samples from fresh noise."""
    schedule = make_schedule("cosine", 1000)
    teacher = oracle(schedule)
    student_ts, fine = distill.plan(schedule.T, steps, 32)
    student = AffineStudent(student_ts, len(MU))
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        noise, y = torch.randn(256, 2, generator=g), torch.randint(0, len(MU), (256,), generator=g)
        states = distill.teacher_path(teacher, schedule, noise, y, student_ts, fine, clip=False)
        x_t, t, target = distill.pairs(schedule, states, student_ts)
        loss = distill.distill_loss(student, Objective.ddpm(schedule, "v"), x_t, t, y.repeat(steps), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise, y = torch.randn(2000, 2, generator=g), torch.randint(0, len(MU), (2000,), generator=g)
    with torch.no_grad():
        want = samplers.ddim(teacher, schedule, noise, y, fine, clip_x0=False)
        got = samplers.ddim(samplers.predictions(student, schedule, "v"), schedule, noise, y, student_ts, clip_x0=False)
    return (got - want).abs().max().item()


@pytest.mark.parametrize("steps", [1, 4])
def test_a_student_of_the_exact_denoiser_reproduces_the_teachers_map(steps):
    # data spread s = 0.5 around means of size ~1.5: a gap of 1e-3 is 0.2% of one standard deviation (it reaches ~5e-5)
    assert distilled_gap(steps) < 1e-3


def test_a_broken_target_fails_the_oracle(monkeypatch):
    """The check above can fail: a target that forgets DDIM's carried-over x_t (the x̂0 of
    where the teacher landed, as if that were clean) leaves a student far off the map."""
    monkeypatch.setattr(samplers, "ddim_x0_for", lambda schedule, x_t, x_s, t, s: x_s / samplers.abar_at(schedule, s, x_s).sqrt())
    assert distilled_gap(4) > 0.1


# --- the command ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def student(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    r = run("distill", "--teacher", tiny_run / "model.safetensors", "--steps", "2", "--teacher-steps", "4",
            "--max-steps", "4", "--sample-every", "2", "--batch-size", "4", "--out", out, "--overwrite", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return out


def test_a_student_records_what_it_is_and_samples_that_way_by_default(student, tiny_run, tmp_path):
    r = run("inspect", student / "model.safetensors", "--json")
    assert r.exit_code == 0, r.output
    # the teacher's own default weight: 12 steps of 16 images put it at the ceiling
    from diffcli.spec import GUIDANCE_CEILING

    assert f'"distilled": "ddim, 2 steps, guidance {GUIDANCE_CEILING:g} built in (one pass a step)"' in r.output
    assert str((tiny_run / "model.safetensors").resolve()) in r.output and '"teacher_sha256"' in r.output
    assert (student / "samples" / "latest.png").exists() and (student / "metrics.jsonl").read_text().count("\n") >= 1
    r = run("sample", "--ckpt", student / "model.safetensors", "--n", "2", "--out", tmp_path / "s.png", "--device", "cpu")
    assert r.exit_code == 0 and f"ddim 2 steps, guidance {GUIDANCE_CEILING:g} built in," in r.output, r.output
    r = run("eval", "--ckpt", student / "model.safetensors", "--n", "2", "--real-n", "10", "--device", "cpu")
    assert r.exit_code == 0 and f"ddim 2 steps, guidance {GUIDANCE_CEILING:g} built in," in " ".join(r.output.split()), r.output
    for bad, fragment in ((("--sampler", "ddpm"), "distilled for ddim with 2 steps; --sampler ddpm"),
                          (("--steps", "5"), "--steps 5 cannot serve it"), (("--guidance", "3"), "drop --guidance")):
        one_sentence_error(run("sample", "--ckpt", student / "model.safetensors", *bad, "--out", tmp_path / "x.png"), fragment)


def test_resuming_a_distillation_is_bit_exact(student, tiny_run, tmp_path, caplog):
    """... and says so when it is given another --teacher, which it does not use."""
    out = tmp_path / "halves"
    args = ("--teacher", tiny_run / "model.safetensors", "--steps", "2", "--teacher-steps", "4", "--sample-every", "2",
            "--batch-size", "4", "--out", out, "--device", "cpu")
    r = run("distill", *args, "--max-steps", "2")
    assert r.exit_code == 0 and re.search(r"2 paths a\s+step\s+\(4 student\s+images\)", r.output), r.output
    assert "teacher" not in caplog.text
    r = run("distill", "--out", out, "--resume", "--max-steps", "4", "--teacher", student / "model.safetensors")
    assert r.exit_code == 0, r.output
    assert f"own teacher '{tiny_run / 'model.safetensors'}', so the --teacher given here is not used" in caplog.text
    whole, halves = (load_file(str(p / "train_state.safetensors")) for p in (student, out))
    assert whole.keys() == halves.keys() and all(torch.equal(whole[k], halves[k]) for k in whole)


def test_a_batch_that_is_not_a_multiple_of_the_steps_is_rounded_down_and_says_so(tiny_run, tmp_path):
    r = run("distill", "--teacher", tiny_run / "model.safetensors", "--steps", "2", "--teacher-steps", "2", "--max-steps", "1",
            "--batch-size", "5", "--out", tmp_path / "s", "--device", "cpu")
    assert r.exit_code == 0 and re.search(r"2 paths a\s+step\s+\(4 student\s+images\)", r.output), r.output


def test_what_cannot_be_distilled_is_refused_in_one_sentence(student, tiny_run, tmp_path):
    one_sentence_error(run("distill", "--teacher", student / "model.safetensors", "--out", tmp_path / "a"),
                       "is itself a distilled student")
    junk = tmp_path / "junk.safetensors"
    save_file({"w": torch.zeros(2)}, str(junk))
    one_sentence_error(run("distill", "--teacher", junk, "--out", tmp_path / "b"), "--teacher: this safetensors file was not written by diffcli")
    one_sentence_error(run("distill", "--teacher", tiny_run / "model.safetensors", "--out", tiny_run, "--overwrite"),
                       "holds the --teacher this command reads")
    one_sentence_error(run("distill", "--teacher", tiny_run / "model.safetensors", "--out", student), "already holds a run")
    one_sentence_error(run("distill", "--teacher", tiny_run / "model.safetensors", "--steps", "5000", "--out", tmp_path / "d"),
                       "--steps (distill.steps) must be between 1 and 999, below the teacher's T=1000; got 5000")
    one_sentence_error(run("distill", "--teacher", tiny_run / "model.safetensors", "--steps", "8", "--teacher-steps", "4",
                           "--out", tmp_path / "e"), "--teacher-steps (4) must be at least --steps (8)")
    assert not (tmp_path / "e").exists()
    one_sentence_error(run("distill", "--teacher", tiny_run / "model.safetensors", "--steps", "64", "--out", tmp_path / "f"),
                       "--teacher-steps (32, the default) must be at least --steps (64)")
    one_sentence_error(run("distill", "--out", tiny_run, "--resume"), "holds a training run, not a distillation")
    one_sentence_error(run("train", "--out", student, "--resume"), "holds a distillation; run it with `diffcli distill`")
    # (compare's default steps once got "drop --steps", an option the user never gave)
    one_sentence_error(run("compare", "--ckpt", student / "model.safetensors", "--out", tmp_path / "c.png"),
                       "is a distilled student: it draws only with its own 2 DDIM steps, so there is nothing to compare")

    from diffcli.checkpoint import load_model, save_model
    from diffcli.config import to_dict
    from diffcli.unet import UNet

    _, cfg, _ = load_model(tiny_run / "model.safetensors")
    cfg.model.num_classes = 0
    uncond = tmp_path / "uncond.safetensors"
    save_model(uncond, UNet(cfg.model).state_dict(), to_dict(cfg), [], 1, 0.0)
    one_sentence_error(run("distill", "--teacher", uncond, "--guidance", "2", "--out", tmp_path / "c"),
                       "trained without classes, so it has no guidance to distil")


def test_a_changed_teacher_stops_a_resume(tiny_run, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((tiny_run / "model.safetensors").read_bytes())
    out = tmp_path / "run"
    assert run("distill", "--teacher", teacher, "--steps", "1", "--teacher-steps", "2", "--max-steps", "1",
               "--batch-size", "2", "--out", out, "--device", "cpu").exit_code == 0
    # A guidance weight tuned meanwhile rewrites only the header: the teacher is the same (twice, the entry copied along)
    from diffcli.files import sha256
    from diffcli.tuning import store

    store(teacher, sha256(teacher), {"weight": 1.5})
    store(teacher, sha256(teacher), {"weight": 2.5})
    assert run("distill", "--out", out, "--resume", "--max-steps", "2").exit_code == 0
    tensors = load_file(str(teacher))
    from safetensors import safe_open

    with safe_open(str(teacher), "pt") as f:
        meta = f.metadata()  # (the tuned entry with its hashes too: other tensors under it are still another teacher)
    save_file({k: v + 1 if k.endswith("weight") else v for k, v in tensors.items()}, str(teacher), metadata=meta)
    one_sentence_error(run("distill", "--out", out, "--resume", "--max-steps", "3"), "has changed since this distillation began")
    for damaged in (b"abc", b"\x10" + bytes(7) + b"[1, 2]" + b" " * 10, teacher.read_bytes()[:1000]):  # not a header, a list, cut
        teacher.write_bytes(damaged)
        one_sentence_error(run("distill", "--out", out, "--resume", "--max-steps", "3"), "has changed since this distillation began")
