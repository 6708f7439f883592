"""The conditional U-Net: `forward(x, t, y) -> prediction` (ε or v, same shape as x).

Layout follows DDPM's network (Ho et al. 2020, App. B; Nichol & Dhariwal 2021):
residual blocks with GroupNorm, time and class embeddings injected by scale-shift
("AdaGN", Dhariwal & Nichol 2021, §3), self-attention at chosen levels and in the
middle, skip connections between matching levels. Class index `num_classes` is the
"no label" token used for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffcli.config import ModelConfig


def group_norm(channels: int, eps: float = 1e-5, groups: int | None = None) -> nn.GroupNorm:
    # 32 groups as in DDPM once there are enough channels; narrow layers keep
    # at least 4 channels per group so the statistics stay meaningful. A fixed count
    # (model.norm_groups) is what diffusers' UNet2DModel can express.
    groups = groups or math.gcd(channels, max(1, min(32, channels // 4)))
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    # Residual branches start as the identity, which keeps early training stable.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, §3.5), shape (B, dim):
    [cos, sin] of t exp(-ln(max_period) i / (dim/2 - freq_shift)); DDPM's own network has
    [sin, cos] and shift 1 (diffusers' `flip_sin_to_cos`, `freq_shift`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if flip_sin_to_cos else parts[::-1], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool, eps: float = 1e-5,
                 groups: int | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch, eps, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch, eps, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # sampling: no autograd needs the inputs kept
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            # norm2's affine folded into the per-image scale and shift, so the big tensor is
            # touched once (addcmul) rather than three times (affine, * (1 + scale), + shift):
            # (n w + b)(1 + s) + c = n [w (1 + s)] + [b (1 + s) + c].
            scale, shift = e.chunk(2, dim=1)
            w, b = self.norm2.weight[:, None, None] * (1 + scale), self.norm2.bias[:, None, None] * (1 + scale) + shift
            h = torch.addcmul(b, F.group_norm(h, self.norm2.num_groups, eps=self.norm2.eps), w)
        else:  # DDPM's original: add the embedding before the second norm
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        return h.add_(self.skip(x))  # conv2's output is not needed by its backward, so in place is safe


class Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int, eps: float = 1e-5, groups: int | None = None):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, eps, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, hw, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, in_chs: list[int], out_ch: int, emb_dim: int, cfg: ModelConfig, attn: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, out_ch, emb_dim, cfg.dropout, cfg.scale_shift, cfg.norm_eps, cfg.norm_groups)
                                    for c in in_chs)
        self.attns = nn.ModuleList(Attention(out_ch, cfg.head_channels, cfg.norm_eps, cfg.norm_groups) if attn else nn.Identity()
                                   for _ in in_chs)


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.student = None  # a spec.Student when distilled: how it must be sampled (checkpoint.load_model)
        self.trained = None  # a spec.Trained (images seen, label knowledge) when known: the default guidance follows it
        levels = len(cfg.channel_mult)
        # Any size halves: a stride-2 conv takes n pixels to ceil(n / 2), and each upsampling
        # goes back to its skip's exact size (diffusers' UNet2DConditionModel passes the same
        # upsample_size), so MNIST's 28 (patches of 2: 14, 7, 4) runs the same network as 32.
        # Only the patches must tile the image.
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not divisible by the patch size {cfg.patch_size}")
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)  # last row: "no label"
        # patch_size p > 1: the image enters as (C·p², H/p, W/p) by space-to-depth and leaves
        # by depth-to-space (pixel shuffle, Shi et al. 2016), so every level works at 1/p²
        # of the pixels - the cheap way to spend a CPU's FLOPs on layout rather than texture.
        self.patch = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * self.patch**2, ch, 3, padding=1)

        chans = [ch * m for m in cfg.channel_mult]
        skip_chs = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cur = ch
        for i, out in enumerate(chans):
            ins = [cur] + [out] * (cfg.num_res_blocks - 1)
            self.down.append(Level(ins, out, emb_dim, cfg, i in cfg.attn_levels))
            cur = out
            skip_chs += [out] * cfg.num_res_blocks
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=cfg.downsample_padding))
                skip_chs.append(cur)

        norm = (cfg.norm_eps, cfg.norm_groups)
        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.dropout, cfg.scale_shift, *norm)
        self.mid_attn = Attention(cur, cfg.head_channels, *norm)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.dropout, cfg.scale_shift, *norm)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, out in reversed(list(enumerate(chans))):
            ins = []
            for _ in range(cfg.num_res_blocks + 1):
                ins.append(cur + skip_chs.pop())
                cur = out
            self.up.append(Level(ins, out, emb_dim, cfg, i in cfg.attn_levels))
            if i > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))

        self.norm_out = group_norm(cur, *norm)
        self.conv_out = zero_init(nn.Conv2d(cur, cfg.in_channels * self.patch**2, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        emb = self.time_mlp(timestep_embedding(t, c.base_channels, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift))
        emb = emb + self.class_emb(y)
        emb = F.silu(emb)  # every consumer applies Linear to SiLU(emb); do it once
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                # padding 0 is DDPM's TF "same" for stride 2: one row and column of zeros, right and bottom
                h = self.downsample[i](h if self.cfg.downsample_padding else F.pad(h, (0, 1, 0, 1)))
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
