"""`noise-preview`: what the forward process q(x_t | x_0) does to one image."""

from __future__ import annotations

import torch
from PIL import Image

from diffcli.data import from_model_range, to_model_range
from diffcli.figures import caption_below, hstack, vstack
from diffcli.images import center_square, pil_to_tensor
from diffcli.schedules import make_schedule, q_sample


def even_steps(T: int, frames: int) -> list[int]:
    """`frames` timesteps from 0 to T - 1, evenly spaced."""
    if frames == 1:
        return [0]
    return sorted({round(i * (T - 1) / (frames - 1)) for i in range(frames)})


def noise_preview(image: Image.Image, schedule_names: list[str], T: int, ts: list[int], size: int, seed: int) -> Image.Image:
    """A strip of x_t for each schedule (one row each), every frame captioned with t and
    sqrt(ᾱ_t), the factor on the original image in x_t. All rows share one noise draw,
    so rows differ only by schedule."""
    x0 = to_model_range(pil_to_tensor(center_square(image, size)))[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    scale = max(1, 96 // size)  # captions need ~96 px of width to stay legible
    rows = []
    for name in schedule_names:
        schedule = make_schedule(name, T)
        frames = []
        for t in ts:
            xt = q_sample(schedule, x0, torch.tensor([t]), noise)
            frame = Image.fromarray(from_model_range(xt)[0].permute(1, 2, 0).squeeze(-1).numpy())
            frame = frame.resize((size * scale, size * scale), Image.NEAREST)
            signal = schedule.alphas_cumprod[t].sqrt().item()
            frames.append(caption_below(frame, f"t={t}\nsignal {signal:.2f}"))
        rows.append(caption_below(hstack(frames), f"{name} schedule, T={T}; signal = sqrt(alpha_bar_t)"))
    return vstack(rows)

