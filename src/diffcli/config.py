"""Run settings as plain dataclasses, presets, and YAML round-trips.

Precedence when a run is assembled (see `build_config`): dataclass defaults, then
the preset, then a `--config` YAML file, then options given on the command line.
The resolved result is written to the run folder as `config.yaml`, which `--config`
accepts back, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from diffcli.errors import UserError


# Classifier-free guidance weight used by `diffcli sample`, `diffcli eval` and the training
# grids. On the MNIST sweep (v-prediction, 2,400 steps) class accuracy is 97.6% at w = 1.5
# and 99.8% at w = 2, while classifier-FD rises with w past 1.5 (0.40, 0.76, 1.21 at 2.5,
# 1.64 at 3): more guidance buys nothing and costs diversity (docs/results.md).
DEFAULT_GUIDANCE = 2.0


@dataclass
class ModelConfig:
    # The defaults are the `small` preset: a narrow full-resolution level and attention
    # only at the lowest resolution, so a 32x32 training image costs 0.58 GFLOP and a
    # 2-core CPU trains ~200 images/s (docs/results.md).
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    # Attention by level index (0 = full resolution), not by pixel size, so one
    # preset serves 28x28 MNIST and 32x32 CIFAR alike. The middle block always has it.
    attn_levels: tuple[int, ...] = (2,)
    head_channels: int = 32  # channels per attention head
    dropout: float = 0.0
    patch_size: int = 1  # > 1: space-to-depth in, pixel shuffle out (see unet.py)
    scale_shift: bool = True  # AdaGN conditioning; False is DDPM's additive embedding
    # Filled in from the dataset when training starts.
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10


@dataclass
class DiffusionConfig:
    # Cosine keeps more signal at mid t than linear, which matters at 28-32 px
    # (Nichol & Dhariwal 2021, §3.2).
    schedule: str = "cosine"
    timesteps: int = 1000
    # "v" (Salimans & Ho 2022) or "eps". v won the step-matched MNIST sweep outright: classifier-FD
    # 0.40 vs 2.36 at each one's best guidance (2,400 steps). On shapes the scores also favour v,
    # but by eye eps draws clearer shapes there, and that classifier penalises eps's grain; still
    # open (docs/results.md, benchmarks/tune_mnist.py, benchmarks/texture_check.py).
    prediction: str = "v"


@dataclass
class DataConfig:
    name: str = "shapes"  # mnist | fashion-mnist | cifar10 | shapes | path to an image folder
    root: str | None = None  # None: $DIFFCLI_DATA_ROOT, else the user cache dir
    image_size: int | None = None  # None: the dataset's own size
    flip: bool | None = None  # None: on for cifar10 and image folders, off for digits and shapes
    limit: int | None = None  # use only the first N images (quick experiments, tests)


@dataclass
class TrainConfig:
    # The defaults are the `small` preset's, chosen on 3-minute CPU runs of shapes
    # (batch 16 and lr 3e-3 both did worse; docs/results.md).
    preset: str = "small"
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to 0 at the last step)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # share of labels replaced by "no label" (for guidance)
    # Min-SNR-γ loss weighting (Hang et al. 2023) with their γ = 5: on shapes it turned 3-minute
    # CPU runs from colour blobs into single objects; 0 gives the plain MSE of DDPM.
    min_snr_gamma: float = 5.0
    # Stopping: whichever comes first; with none of them set, `epochs` defaults to 10.
    epochs: float | None = None
    max_steps: int | None = None
    minutes: float | None = None
    on_nonfinite: str = "stop"  # NaN/inf loss: "stop" (keep the last checkpoint) or "rollback" (to the last good state)
    sample_every: int = 1000  # steps between sample grids (and checkpoints)
    grid_steps: int = 25  # DDIM steps for those grids: cheap, good enough to judge progress
    seed: int = 0
    device: str = "auto"
    compile: bool | None = None  # torch.compile the U-Net; None: on for CUDA only (compiling.py)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16" (devices.py)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}

# Presets set the architecture and the optimiser settings that go with its size.
PRESETS: dict[str, dict[str, dict]] = {
    # Seconds on a CPU: for tests and smoke runs, not for pictures.
    "tiny": {
        "model": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), head_channels=8),
        "train": dict(batch_size=16, lr=1e-3, warmup_steps=10, ema_decay=0.99, sample_every=50, grid_steps=4),
    },
    # MNIST / shapes on a laptop CPU: the dataclass defaults above.
    "small": {"model": {}, "train": {}},
    # The DDPM CIFAR-10 network (Ho et al. 2020, App. B): 128 channels, mult 1,2,2,2,
    # two blocks per level, attention at 16x16, dropout 0.1, additive time embedding:
    # 35.7M parameters (scale-shift would add 2.6M).
    "base": {
        "model": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                      head_channels=64, dropout=0.1, scale_shift=False),
        "train": dict(batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, sample_every=5000),
    },
}


def _coerce(value, hint, where: str):
    """Check one YAML value against a dataclass field type; name the key when it is wrong."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{where}' must be a list, got {value!r}.")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{where}' must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{where}' must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{where}' must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{where}' must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported field type {hint} for {where}")


def _apply(obj, values: dict, section: str):
    if not isinstance(values, dict):
        raise UserError(f"config section '{section}' must be a mapping of keys to values.")
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise UserError(f"unknown config key '{section}.{key}'; known keys in '{section}': {known}.")
        setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def apply_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """Apply a nested dict {section: {key: value}} onto `cfg` in place, validating types."""
    if not isinstance(overrides, dict):
        raise UserError("a config file must hold a mapping with sections model, diffusion, data, train.")
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'; known: {', '.join(SECTIONS)}.")
        _apply(getattr(cfg, section), values or {}, section)
    return cfg


def preset_config(preset: str) -> RunConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    cfg = RunConfig()
    apply_overrides(cfg, {s: dict(v) for s, v in PRESETS[preset].items()})
    cfg.train.preset = preset
    return cfg


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist or is not a file.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file '{path}' is not valid YAML ({type(e).__name__}).") from None
    return data or {}


def build_config(preset: str | None, config_file: str | None, cli: dict) -> RunConfig:
    """Defaults < preset < YAML file < command-line options (only those given)."""
    file_values = load_yaml(config_file) if config_file else {}
    if not isinstance(file_values, dict):
        raise UserError(f"config file '{config_file}' must hold a mapping with sections model, diffusion, data, train.")
    preset = preset or (file_values.get("train") or {}).get("preset") or TrainConfig.preset
    cfg = preset_config(preset)
    apply_overrides(cfg, file_values)
    apply_overrides(cfg, {s: {k: v for k, v in vals.items() if v is not None} for s, vals in cli.items()})
    cfg.train.preset = preset
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks a type check cannot do; each message names the key."""
    from diffcli.schedules import SCHEDULES

    m, d, t = cfg.model, cfg.diffusion, cfg.train
    checks = [
        (m.base_channels >= 4, "model.base_channels must be at least 4"),
        (len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult), "model.channel_mult must be a non-empty list of positive integers"),
        (m.num_res_blocks >= 1, "model.num_res_blocks must be at least 1"),
        (m.patch_size >= 1, "model.patch_size must be at least 1"),
        (all(0 <= lv < len(m.channel_mult) for lv in m.attn_levels), "model.attn_levels must be level indices below len(channel_mult)"),
        (m.head_channels >= 1, "model.head_channels must be positive"),
        (0 <= m.dropout < 1, "model.dropout must be in [0, 1)"),
        (d.schedule in SCHEDULES, f"diffusion.schedule must be one of {', '.join(SCHEDULES)}"),
        (d.timesteps >= 2, "diffusion.timesteps must be at least 2"),
        (d.prediction in ("eps", "v"), "diffusion.prediction must be 'eps' or 'v'"),
        (cfg.data.image_size is None or cfg.data.image_size >= 4, "data.image_size must be at least 4"),
        (cfg.data.limit is None or cfg.data.limit >= 1, "data.limit must be at least 1"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.lr > 0, "train.lr must be positive"),
        (t.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
        (t.warmup_steps >= 0, "train.warmup_steps must be 0 or more"),
        (t.weight_decay >= 0, "train.weight_decay must be 0 or more"),
        (t.grad_clip >= 0, "train.grad_clip must be 0 (off) or more"),
        (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (0 <= t.label_dropout < 1, "train.label_dropout must be in [0, 1)"),
        (t.min_snr_gamma >= 0, "train.min_snr_gamma must be 0 (off) or more"),
        (t.epochs is None or t.epochs > 0, "train.epochs must be positive"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be at least 1"),
        (t.minutes is None or t.minutes > 0, "train.minutes must be positive"),
        (t.sample_every >= 1, "train.sample_every must be at least 1"),
        (t.on_nonfinite in ("stop", "rollback"), "train.on_nonfinite must be 'stop' or 'rollback'"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"),
        (1 <= t.grid_steps <= d.timesteps, "train.grid_steps must be between 1 and diffusion.timesteps"),
        (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:"), "train.device must be auto, cpu, cuda or mps"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML and JSON."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in SECTIONS}


def from_dict(values: dict) -> RunConfig:
    return apply_overrides(RunConfig(), values)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    import yaml

    from diffcli.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
