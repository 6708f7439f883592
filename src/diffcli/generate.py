"""Turn a trained U-Net into pictures: per-image seeds, guidance, batching.

The glue between the network (unet.py) and the pure samplers (samplers.py), used by
`diffcli sample` and by the sample grids written during training.
"""

from __future__ import annotations

import torch

from diffcli import samplers
from diffcli.config import DEFAULT_GUIDANCE
from diffcli.data import from_model_range
from diffcli.devices import autocast
from diffcli.schedules import Schedule



@torch.no_grad()
def generate(model: torch.nn.Module, schedule: Schedule, prediction: str, labels: list[int], seeds: list[int],
             sampler: str = "ddim", steps: int | None = None, guidance: float = DEFAULT_GUIDANCE, eta: float = 0.0,
             variance: str = "beta_tilde", clip_x0: bool = True, batch_size: int = 64,
             callback=None) -> torch.Tensor:
    """Images (N, C, H, W) uint8, image i made from seed seeds[i] and label labels[i].

    `labels` may hold the model's "no label" index (num_classes) for unconditional
    images. Results do not depend on `batch_size` (each image owns its generator).
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    null = cfg.num_classes
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)

    def network(x, t, y):
        with autocast(device):
            return model(x, t, y)

    if cfg.num_classes > 0:
        network = samplers.guided(network, guidance, null)
    denoise = samplers.predictions(network, schedule, prediction)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = slice(start, start + batch_size)
        randn_like = samplers.PerImageNoise(seeds[chunk], device)
        noise = randn_like(torch.empty(len(seeds[chunk]), *shape, device=device))
        y = torch.tensor(labels[chunk], device=device, dtype=torch.long)
        cb = None if callback is None else (lambda i, t, x, x0, s=start: callback(s, i, t, x, x0))
        x = samplers.sample(sampler, denoise, schedule, noise, y, randn_like, steps=steps, eta=eta,
                            variance=variance, clip_x0=clip_x0, callback=cb)
        out.append(from_model_range(x).cpu())
    return torch.cat(out)
