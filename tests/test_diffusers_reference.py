"""diffcli against diffusers, an implementation nobody here wrote.

diffusers options that correspond to diffcli's:
- linear schedule: beta_schedule="linear" with beta_start = 1e-4 * 1000/T and
  beta_end = 0.02 * 1000/T (diffcli scales DDPM's end points to keep the total noise
  the same when T != 1000; at T = 1000 they are DDPM's 1e-4 and 0.02);
- cosine schedule: beta_schedule="squaredcos_cap_v2" (s = 0.008, betas capped at 0.999);
- prediction "eps" / "v": prediction_type="epsilon" / "v_prediction";
- no clipping: clip_sample=False here and clip_x0=False in diffcli;
- DDPM variance β̃ / β: variance_type="fixed_small" / "fixed_large";
- DDIM: timestep_spacing="trailing", set_alpha_to_one=True (the last step lands on ᾱ = 1).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffcli import samplers
from diffcli.schedules import make_schedule, q_sample

CASES = [(name, T) for name in ("linear", "cosine") for T in (1000, 512)]
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


def diffusers_kwargs(name, T, prediction="eps"):
    return dict(
        num_train_timesteps=T,
        beta_start=1e-4 * 1000 / T,
        beta_end=0.02 * 1000 / T,
        beta_schedule="linear" if name == "linear" else "squaredcos_cap_v2",
        clip_sample=False,
        prediction_type=PREDICTIONS[prediction],
    )


def close(ours, ref, tol, what):
    """Elementwise |ours - ref| <= tol * max(1, |ref|): relative for large values, absolute near 0."""
    err = ((ours - ref).abs() / ref.abs().clamp(min=1)).max().item()
    assert err <= tol, f"{what}: max scaled difference {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name,T", CASES)
def test_betas_and_alphas_cumprod(name, T):
    ours = make_schedule(name, T)
    ref = DDPMScheduler(**diffusers_kwargs(name, T))
    rel = lambda a, b: ((a.double() - b.double()).abs() / b.double().abs()).max().item()
    assert rel(ours.betas, ref.betas) <= 1e-6, f"betas ({name}, T={T}): {rel(ours.betas, ref.betas):.1e}"
    # ᾱ equal to 1e-6 relative at every t, except the last cosine entry: there β is capped at
    # 0.999 and 1 - β = 0.001 is known to only ~3e-5 relative once β is rounded to float32
    # (diffusers stores β in float32 and multiplies in float32; diffcli does both in float64).
    a, b = ours.alphas_cumprod, ref.alphas_cumprod
    last_ok = 1e-6 if name == "linear" else 4e-5
    assert rel(a[:-1], b[:-1]) <= 1e-6, f"alphas_cumprod ({name}, T={T}): {rel(a[:-1], b[:-1]):.1e}"
    assert rel(a[-1:], b[-1:]) <= last_ok, f"last alphas_cumprod ({name}, T={T}): {rel(a[-1:], b[-1:]):.1e}"


@pytest.mark.parametrize("name,T", CASES)
def test_forward_process_matches_add_noise(name, T):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    t = torch.randint(0, T, (16,), generator=g)
    t[:2] = torch.tensor([0, T - 1])
    ref = DDPMScheduler(**diffusers_kwargs(name, T)).add_noise(x0, noise, t)
    close(q_sample(make_schedule(name, T), x0, t, noise), ref, 1e-5, f"q_sample vs add_noise ({name}, T={T})")


def step_tol(schedule, t):
    """1e-5, except where float32 itself cannot do better, in both implementations alike:
    - small t: 1 - ᾱ_t (2e-4 at t = 1, linear) is a difference of float32 numbers near 1, so
      it carries a relative error of ~2^-24 / (1 - ᾱ_t), and so does every coefficient built on it;
    - the last cosine timestep: β capped at 0.999 leaves 1 - β = 0.001 known to ~3e-5 in float32.
    """
    one_minus = 1 - schedule.alphas_cumprod[t].item()
    capped = schedule.name == "cosine" and t == schedule.T - 1
    return max(1e-5, 2 * 2**-24 / one_minus, 4e-5 if capped else 0)


def step_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)  # x_t, model output


@pytest.mark.parametrize("name,T", CASES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("variance,variance_type", [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
def test_one_ddpm_step(name, T, prediction, variance, variance_type):
    schedule = make_schedule(name, T)
    ref = DDPMScheduler(**diffusers_kwargs(name, T, prediction), variance_type=variance_type)
    for t in (T - 1, T // 2, 1, 0):
        x, out = step_inputs(t)
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        eps, x0 = samplers.predictions(lambda *_: out, schedule, prediction)(x, torch.full((4,), t), torch.zeros(4, dtype=torch.long))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))  # what diffusers draws
        ours = samplers.ddpm_step(schedule, x, t, x0, noise, variance)
        close(ours, expected, step_tol(schedule, t), f"DDPM step t={t} ({name}, T={T}, {prediction}, {variance})")


@pytest.mark.parametrize("name,T", CASES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_ddim_step(name, T, prediction, eta):
    schedule = make_schedule(name, T)
    ref = DDIMScheduler(**diffusers_kwargs(name, T, prediction), timestep_spacing="trailing", set_alpha_to_one=True)
    steps = 50
    ref.set_timesteps(steps)
    for t in ref.timesteps.tolist()[:: 7] + [ref.timesteps[-1].item()]:
        prev = t - T // steps  # the timestep diffusers' DDIM steps to (see test_ddim_timesteps)
        x, out = step_inputs(t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t + 1))
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        eps, x0 = samplers.predictions(lambda *_: out, schedule, prediction)(x, torch.full((4,), t), torch.zeros(4, dtype=torch.long))
        ours = samplers.ddim_step(schedule, x, t, prev if prev >= 0 else -1, eps, x0, eta, noise)
        close(ours, expected, step_tol(schedule, t), f"DDIM step t={t}->{prev} ({name}, T={T}, {prediction}, eta={eta})")


@pytest.mark.parametrize("T", [1000, 512])
@pytest.mark.parametrize("steps", [10, 50, 100])
def test_ddim_timesteps(T, steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert samplers.timesteps(T, steps) == ref.timesteps.tolist(), f"trailing timesteps, T={T}, {steps} steps"


def test_where_diffcli_steps_differently_from_diffusers():
    """Where T is not a multiple of the step count, diffusers' DDIM steps from t to
    t - T // steps, which is not always the next timestep of its own list (T=512, 10 steps:
    409 -> 358, yet the list goes on 357). diffcli always steps to the next listed timestep,
    so the final step lands exactly on ᾱ = 1 from the last listed one. docs/correctness.md."""
    ref = DDIMScheduler(num_train_timesteps=512, timestep_spacing="trailing")
    ref.set_timesteps(10)
    listed = ref.timesteps.tolist()
    diffusers_prev = [t - 512 // 10 for t in listed]
    assert listed[1:] != diffusers_prev[:-1], "diffusers now steps to its listed timesteps; update the docs"
    assert samplers.timesteps(512, 10) == listed


def test_leading_spacing_is_diffusers_default_and_not_ours():
    """diffusers' default "leading" spacing never visits t = T-1 (980 is its first of 50)."""
    ref = DDIMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(50)
    assert ref.config.timestep_spacing == "leading" and ref.timesteps[0].item() == 980
    assert samplers.timesteps(1000, 50)[0] == 999
