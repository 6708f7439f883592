"""Edit and explore with a trained model: image-to-image (SDEdit), inpainting (RePaint),
DDIM inversion, and interpolation between two seeds or two labels.

Every function takes uint8 images and returns uint8 images, one output per entry of
`labels`/`seeds`; each output draws its noise from its own seed, as `generate` does, so
the results do not depend on the batch size. The sampler settings come in one
`SamplerSpec`; nothing here prints.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from diffcli import image_samplers, samplers
from diffcli.data import to_model_range
from diffcli.errors import UserError
from diffcli.generate import denoiser, generate, per_batch, sampling_network
from diffcli.objective import Objective
from diffcli.schedules import Schedule, q_sample
from diffcli.spec import DDIM_SAMPLERS, EDIT_GUIDANCE, SamplerSpec


def for_edit(spec: SamplerSpec, model) -> SamplerSpec:
    """`spec` with EDIT_GUIDANCE where it leaves the guidance to the default (a distilled
    student has its guidance built in, and keeps it)."""
    return replace(spec, guidance=EDIT_GUIDANCE) if spec.guidance is None and model.student is None else spec


def first_step(spec: SamplerSpec, schedule: Schedule, strength: float) -> int:
    """SDEdit's start (Meng et al. 2022): the index into the sampler's timesteps from which
    the last round(strength x steps) steps run, as diffusers' img2img pipelines count them.
    0 is the whole trajectory from pure noise; len(plan) is no step at all."""
    steps = len(samplers.plan(spec, schedule))
    return steps - round(steps * strength)


@torch.no_grad()
def img2img(model, objective: Objective, spec: SamplerSpec, *, images: torch.Tensor, labels: list[int],
            seeds: list[int], strength: float, batch_size: int = 64) -> torch.Tensor:
    """Noise each image to the timestep `strength` of the way to T with its seed's noise,
    then sample it back under its label. Strength 0 returns the images; strength 1 starts
    from the noise alone and is `generate` with the same seeds and labels. Guidance
    defaults to EDIT_GUIDANCE."""
    schedule = objective.schedule
    spec = for_edit(spec, model).resolve(schedule.T, model.student, model.trained)
    plan, first = samplers.plan(spec, schedule), first_step(spec, schedule, strength)
    if first == len(plan):
        return images.clone()
    denoise = denoiser(model, objective, spec.guidance, spec.interval)

    def run(chunk: slice, randn_like) -> torch.Tensor:
        x0 = to_model_range(images[chunk].to(randn_like.device))
        noise = randn_like(x0)  # the first draw of each image's generator, as in `generate`
        if first > 0:
            noise = q_sample(schedule, x0, torch.full((len(x0),), plan[first], device=x0.device), noise)
        y = torch.tensor(labels[chunk], device=x0.device)
        return samplers.sample(spec, denoise, schedule, noise, y, randn_like, first=first)

    return per_batch(model, seeds, batch_size, run)


@torch.no_grad()
def inpaint(model, objective: Objective, spec: SamplerSpec, *, images: torch.Tensor, redraw: torch.Tensor,
            labels: list[int], seeds: list[int], jumps: int, batch_size: int = 64) -> torch.Tensor:
    """Redraw where `redraw` (N, 1, H, W) is True under each label, keeping the rest of
    each image exactly (RePaint, `image_samplers.repaint`, with `jumps` tries of every step)."""
    schedule = objective.schedule
    spec = spec.resolve(schedule.T, model.student, model.trained)
    if spec.sampler not in (*DDIM_SAMPLERS, "ddpm"):
        raise UserError(f"inpainting runs --sampler ddim, euler or ddpm, whose steps each start afresh from the image "
                        f"with its kept region put back; {spec.sampler}'s do not.")
    denoise = denoiser(model, objective, spec.guidance, spec.interval)

    def run(chunk: slice, randn_like) -> torch.Tensor:
        known = to_model_range(images[chunk].to(randn_like.device))
        keep = (~redraw[chunk]).to(known.device, known.dtype)
        y = torch.tensor(labels[chunk], device=known.device)
        return image_samplers.repaint(spec, denoise, schedule, randn_like(known), y, randn_like, known, keep, jumps)

    return per_batch(model, seeds, batch_size, run)


@torch.no_grad()
def invert(model, objective: Objective, spec: SamplerSpec, *, images: torch.Tensor,
           source_labels: list[int], labels: list[int], batch_size: int = 64) -> torch.Tensor:
    """A deterministic edit: DDIM-invert each image under its source label with the plain
    conditional model (guidance 1: inversion under stronger guidance drifts, Mokady et al.
    2023, §3), then run DDIM back down under its label with the spec's guidance. With the
    same label and guidance 1 the image comes back, up to the ODE's discretisation.
    Guidance defaults to EDIT_GUIDANCE."""
    schedule = objective.schedule
    spec = for_edit(spec, model).resolve(schedule.T, model.student, model.trained)
    if spec.sampler not in DDIM_SAMPLERS or spec.eta != 0 or spec.spacing != "trailing" or spec.shift != 1:
        raise UserError("--invert runs DDIM (Euler) both ways on trailing steps: use --sampler ddim or euler, "
                        "without --eta or --shift.")
    there = denoiser(model, objective, 1.0)
    back = denoiser(model, objective, spec.guidance, spec.interval)

    def run(chunk: slice, randn_like) -> torch.Tensor:
        x0 = to_model_range(images[chunk].to(randn_like.device))
        src, y = (torch.tensor(v[chunk], device=x0.device) for v in (source_labels, labels))
        x_T = image_samplers.ddim_invert(there, schedule, x0, src, spec.steps)
        return samplers.ddim(back, schedule, x_T, y, spec.steps, clip_x0=spec.clip)

    return per_batch(model, list(range(len(labels))), batch_size, run)  # no noise is drawn


# --- interpolation -------------------------------------------------------------

def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) between two noise tensors: Gaussian noise
    lives near a sphere, so the frames between keep its norm where a straight line would
    shrink it and sample washed-out images. alpha 0 and 1 give a and b exactly."""
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum() / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1)).item()
    if theta < 1e-4:  # (nearly) the same direction: the straight line is the arc
        return ((1 - alpha) * a64 + alpha * b64).to(a.dtype)
    wa, wb = math.sin((1 - alpha) * theta) / math.sin(theta), math.sin(alpha * theta) / math.sin(theta)
    return (wa * a64 + wb * b64).to(a.dtype)


def _deterministic(spec: SamplerSpec, model, T: int) -> SamplerSpec:
    spec = spec.resolve(T, model.student, model.trained)
    if spec.sampler == "ddpm" or spec.eta > 0:
        raise UserError("interpolation needs a deterministic sampler, so that nearby noise gives nearby images: "
                        "use --sampler ddim, euler, dpm++ or heun.")
    return spec


@torch.no_grad()
def between_seeds(model, objective: Objective, spec: SamplerSpec, *, label: int, seeds: tuple[int, int],
                  frames: int, batch_size: int = 64) -> torch.Tensor:
    """`frames` images under one label whose starting noise moves along the great circle
    from seed a's noise to seed b's; the first and last are `generate` for a and b."""
    schedule = objective.schedule
    spec = _deterministic(spec, model, schedule.T)
    cfg, device = model.cfg, next(model.parameters()).device
    shape = (1, cfg.in_channels, cfg.image_size, cfg.image_size)
    ends = [samplers.PerImageNoise([s], device)(torch.empty(shape, device=device)) for s in seeds]
    noise = torch.cat([slerp(*ends, alpha) for alpha in _alphas(frames)])
    denoise = denoiser(model, objective, spec.guidance, spec.interval)

    def run(chunk: slice, randn_like) -> torch.Tensor:
        y = torch.full((len(noise[chunk]),), label, device=device)
        return samplers.sample(spec, denoise, schedule, noise[chunk], y, randn_like)

    return per_batch(model, [seeds[0]] * frames, batch_size, run)


@torch.no_grad()
def between_labels(model, objective: Objective, spec: SamplerSpec, *, labels: tuple[int, int], seed: int,
                   frames: int, batch_size: int = 64) -> torch.Tensor:
    """`frames` images from one seed's noise whose condition moves from label a to label b
    by guidance toward the mixed condition (`mixed_guidance`); the end frames are `generate`
    for a and for b, the frames between share their starting noise."""
    schedule = objective.schedule
    spec = _deterministic(spec, model, schedule.T)
    cfg, device = model.cfg, next(model.parameters()).device
    alphas = _alphas(frames)[1:-1]

    def run(chunk: slice, randn_like) -> torch.Tensor:
        alpha = torch.tensor(alphas[chunk], device=device)
        denoise = samplers.predictions(mixed_guidance(model, objective, labels, alpha, spec.guidance), schedule, objective.prediction)
        noise = randn_like(torch.empty(len(alpha), cfg.in_channels, cfg.image_size, cfg.image_size, device=device))
        return samplers.sample(spec, denoise, schedule, noise, torch.zeros(len(alpha), dtype=torch.long), randn_like)

    ends = generate(model, objective, spec, labels=list(labels), seeds=[seed, seed])
    middle = per_batch(model, [seed] * len(alphas), batch_size, run) if alphas else ends[:0]
    return torch.cat([ends[:1], middle, ends[1:]])


def mixed_guidance(model, objective: Objective, labels: tuple[int, int], alpha: torch.Tensor, w: float) -> samplers.Network:
    """A network for the condition α of the way from label a to label b (one α per image):
    out = out(∅) + w ((1-α) out(a) + α out(b) - out(∅)), classifier-free guidance toward the
    product p(x|a)^(1-α) p(x|b)^α of the two conditionals. The labels it is called with are
    ignored. Mixing the class embeddings instead would need the network's inside, and an
    average of two embeddings is a point the network never saw in training."""
    device, null = next(model.parameters()).device, model.cfg.num_classes
    a = alpha.float().reshape(-1, 1, 1, 1)
    net = sampling_network(model, objective)

    def mixed(x, t, _y):
        n = x.shape[0]
        ys = torch.tensor([labels[0]] * n + [labels[1]] * n + [null] * n, device=device)
        cond_a, cond_b, uncond = net(torch.cat([x] * 3), torch.cat([t] * 3), ys).float().chunk(3)
        return uncond + w * ((1 - a) * cond_a + a * cond_b - uncond)

    return mixed


def _alphas(frames: int) -> list[float]:
    return [i / (frames - 1) for i in range(frames)]
