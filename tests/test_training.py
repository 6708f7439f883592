import json
import math
from pathlib import Path

import pytest
import torch

from diffcli import ema
from diffcli.config import preset_config
from diffcli.fitting import lr_at
from diffcli.objective import Objective
from diffcli.schedules import make_schedule
from diffcli.training import batch_inputs


def ddpm(T: int) -> Objective:
    return Objective.ddpm(make_schedule("cosine", T), "v")


def test_timesteps_are_uniform_chi_square():
    g = torch.Generator().manual_seed(0)
    T, n = 50, 50_000
    x0 = torch.zeros(n, 1)
    t, _, _ = batch_inputs(x0, torch.zeros(n, dtype=torch.long), ddpm(T), 10, 0.1, g)
    counts = torch.bincount(t, minlength=T).double()
    assert t.min() == 0 and t.max() == T - 1
    chi2 = ((counts - n / T) ** 2 / (n / T)).sum().item()
    # chi-square with 49 dof: P(chi2 > 85) ≈ 1e-3
    assert chi2 < 85, f"timestep histogram chi2={chi2:.1f}"


def test_noise_is_standard_normal_not_uniform():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    _, noise, _ = batch_inputs(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), ddpm(1000), 10, 0.1, g)
    assert abs(noise.mean().item()) < 5 / math.sqrt(n), "noise mean"
    assert abs(noise.var().item() - 1) < 5 * math.sqrt(2 / n), "noise variance"
    kurtosis = (noise**4).mean().item()  # 3 for a normal, 1.8 for a uniform
    assert abs(kurtosis - 3) < 0.1, f"noise kurtosis {kurtosis}"


def test_label_dropout_rate_within_binomial_bounds():
    g = torch.Generator().manual_seed(2)
    n, p = 100_000, 0.1
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(3))
    _, _, y = batch_inputs(torch.zeros(n, 1), labels, ddpm(1000), 10, p, g)
    dropped = (y == 10).sum().item()
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 5 * sd, f"dropped {dropped} of {n}"
    kept = y != 10
    assert torch.equal(y[kept], labels[kept]), "labels that are kept must not change"


def test_lr_warmup_then_cosine():
    tc = preset_config("small").train
    tc.lr, tc.warmup_steps, tc.lr_schedule = 1.0, 10, "cosine"
    assert lr_at(0, tc, 0.0) == pytest.approx(0.1)
    assert lr_at(9, tc, 0.0) == pytest.approx(1.0)
    assert lr_at(100, tc, 0.5) == pytest.approx(0.5)
    assert lr_at(100, tc, 1.0) == pytest.approx(0.0)
    tc.lr_schedule = "constant"
    assert lr_at(100, tc, 0.9) == 1.0


def test_ema_follows_the_weights_by_its_decay():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema.update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    assert ema.classic_decay(1, 0.999) == pytest.approx(0.1)  # the first update: (1 + 0) / (10 + 0)
    assert ema.classic_decay(10**6, 0.999) == 0.999


def test_tiny_run_writes_everything(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"model.safetensors", "train_state.safetensors", "config.yaml", "metrics.jsonl", "samples"} <= names
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["step"] == 12, "the tail since the last full interval must be logged"
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in lines)
    assert (tiny_run / "samples" / "step_0000012.png").exists() and (tiny_run / "samples" / "latest.png").exists()


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_training_reduces_the_loss(kind):
    """Forty steps on one repeated batch: the ε-MSE (or the flow's velocity MSE) must fall well
    below its starting value of ~1 (~1 + the images' variance)."""
    from diffcli.data import make_shapes, to_model_range
    from diffcli.training import diffusion_loss
    from diffcli.unet import UNet

    cfg = preset_config("tiny").model
    cfg.image_size, cfg.num_classes = 16, 10
    torch.manual_seed(0)
    model = UNet(cfg)
    data = make_shapes(size=16, per_class=2)
    x0 = to_model_range(data.images)
    from diffcli import flow

    objective = Objective.ddpm(make_schedule("cosine", 100), "eps") if kind == "ddpm" else Objective.flow(100, "uniform")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(20, 100, (20,), generator=g)
    t = t if kind == "ddpm" else t / 100  # flow: times in (0, 1)
    noise = torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(40):
        loss = diffusion_loss(model, objective, x0, t, noise, data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 and losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("native", [False, True])
def test_precision_chooses_autocast_and_layout_per_device(monkeypatch, native):
    from diffcli import devices
    from diffcli.devices import autocast, memory_format, sampling_autocast

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)  # both answers, whichever CPU runs the tests
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert conv(x).dtype == torch.bfloat16  # the convolutions really run in bf16
    with autocast(cpu, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(cpu, "auto"):  # bf16 where the CPU has it natively, fp32 where it would be emulated
        assert conv(x).dtype == (torch.bfloat16 if native else torch.float32)
    with sampling_autocast(cpu):  # sampling stays fp32 on every CPU: one seed, one picture
        assert conv(x).dtype == torch.float32
    assert memory_format(cpu, "bf16") == torch.contiguous_format  # oneDNN's faster bf16 layout
    assert memory_format(cpu, "auto") == (torch.contiguous_format if native else torch.channels_last)
    assert memory_format(cpu, "fp32") == memory_format(torch.device("cuda"), "bf16") == torch.channels_last
    # networks narrower than BF16_MIN_WIDTH (the `tiny` preset) stay fp32 channels_last even so
    assert devices.precision_for(cpu, "auto", width=8) == "fp32"
    assert devices.precision_for(cpu, "auto", width=devices.BF16_MIN_WIDTH) == ("bf16" if native else "fp32")
    assert memory_format(cpu, devices.precision_for(cpu, "auto", width=8)) == torch.channels_last
    assert devices.precision_for(cpu, "bf16", width=8) == "bf16"  # asked for, it is given


def test_native_bf16_is_read_from_the_cpu_flags():
    from diffcli.devices import cpu_has_native_bf16

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo to check against")
    assert cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_bf16_training_saves_fp32_weights(tmp_path):
    from safetensors.torch import load_file

    from diffcli import data as D
    from diffcli.training import train

    cfg = preset_config("tiny")
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = 16, 3, 10
    cfg.train.max_steps, cfg.train.precision = 3, "bf16"
    result = train(cfg, D.load("shapes", image_size=16, limit=48), tmp_path)
    weights = load_file(str(result.model_path))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
