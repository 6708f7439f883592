"""diffusers U-Nets configured to match diffcli's presets (same layout, parameters within 5%)."""

from __future__ import annotations

import subprocess
import sys


def in_fresh_process(script: str, name: str, argv: list[str]) -> list[float]:
    """Run `script --worker NAME ARGV` in a new Python process and return the numbers it
    prints last: each contender gets a process set up as its own tool sets it up."""
    out = subprocess.run([sys.executable, script, "--worker", name, *argv], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.splitlines()[-1].split()]


def diffusers_unet(preset: str, image_size: int = 32, channels: int = 3, num_classes: int = 10):
    from diffusers import UNet2DModel

    common = dict(sample_size=image_size, in_channels=channels, out_channels=channels, num_class_embeds=num_classes + 1)
    if preset == "small":  # diffcli small's MATCHED layout: 16 x (1, 2, 4), one block per level, attention at the lowest level
        return UNet2DModel(**common, layers_per_block=1, block_out_channels=(16, 32, 64), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32)
    if preset == "base":  # the DDPM CIFAR-10 network, as diffcli's base
        return UNet2DModel(**common, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64)
    raise ValueError(preset)


# UNet2DModel has no patches, so the implementations are compared at the full-resolution layout
# of `small`'s widths, 16 x (1, 2, 4): the `small` preset until 2026-12-04, when it moved to 2x2
# patches at 32 x (1, 2, 2) (docs/usage.md).
MATCHED = {"small": dict(base_channels=16, channel_mult=(1, 2, 4), patch_size=1)}


def diffcli_unet(preset: str, image_size: int = 32, channels: int = 3, num_classes: int = 10, matched: bool = False):
    """diffcli's U-Net of `preset`; `matched`: in the layout diffusers_unet(preset) can also build."""
    from diffcli.config import preset_config
    from diffcli.unet import UNet

    cfg = preset_config(preset).model
    for key, value in (MATCHED.get(preset, {}) if matched else {}).items():
        setattr(cfg, key, value)
    cfg.image_size, cfg.in_channels, cfg.num_classes = image_size, channels, num_classes
    return UNet(cfg)
