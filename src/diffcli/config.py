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

from diffcli.checks import AT_LEAST_ONE, IMAGE_SIZE, NON_NEGATIVE, POSITIVE, SEED, SHARE, TIMESTEPS, Range, bounded, check_fields, yaml_number
from diffcli.errors import UserError
from diffcli.files import atomic_write_bytes
from diffcli.spec import DEFAULT_GUIDANCE, Student


@dataclass
class ModelConfig:
    # The defaults are the `small` preset: 2x2 patches in, then 32 x (1, 2, 2) at 16, 8, 4 px for 32x32,
    # 0.38 training GFLOP an image: 1.6x the CPU steps of the full-resolution 16 x (1, 2, 4) it replaced
    # and far better shapes in 2 minutes (docs/results.md).
    base_channels: int = bounded(32, Range(4))
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = bounded(1, AT_LEAST_ONE)
    # Attention by level index (0 = full resolution), not pixel size: one preset serves 28 and 32 px. The middle block always has it.
    attn_levels: tuple[int, ...] = (2,)
    head_channels: int = bounded(32, AT_LEAST_ONE)  # channels per attention head
    dropout: float = bounded(0.0, SHARE)
    patch_size: int = bounded(2, AT_LEAST_ONE)  # > 1: space-to-depth in, pixel shuffle out (see unet.py)
    scale_shift: bool = True  # AdaGN conditioning; False is DDPM's additive embedding
    norm_groups: int | None = bounded(None, AT_LEAST_ONE)  # None: by width (unet.group_norm); a count: that one everywhere
    # Details of DDPM's published network, for models imported from diffusers (hub.py):
    norm_eps: float = bounded(1e-5, POSITIVE)  # every GroupNorm's epsilon
    downsample_padding: int = bounded(1, Range(0, 1))  # 0: pad right and bottom by one instead, as DDPM's TF code
    flip_sin_to_cos: bool = True  # the time embedding as [cos, sin] (True) or [sin, cos]
    freq_shift: int = bounded(0, Range(0, 1))  # its frequencies exp(-ln(1e4) i / (dim/2 - shift))
    image_size: int = bounded(32, IMAGE_SIZE)  # this and the next two: filled in from the dataset
    in_channels: int = bounded(3, AT_LEAST_ONE)
    num_classes: int = bounded(10, NON_NEGATIVE)


@dataclass
class DiffusionConfig:
    # Cosine keeps more signal at mid t than linear, which matters at 28-32 px (Nichol & Dhariwal 2021, §3.2).
    schedule: str = "cosine"
    timesteps: int = bounded(1000, TIMESTEPS)
    # "v" (Salimans & Ho 2022) or "eps". v won the step-matched MNIST sweep outright: classifier-FD 0.40 vs 2.36 at
    # each one's best guidance (2,400 steps). On shapes, scored by a classifier grain does not fool, eps is 7 points
    # more accurate at an equal best FD (4.48 vs 4.49): v loses less, so it stays (results.md).
    prediction: str = "v"
    objective: str = "ddpm"  # or "flow" (objective.py), ahead on CIFAR-10 only (benchmarks.md); unused then: schedule, prediction, min_snr_gamma
    time_sampling: str = "logit-normal"  # flow's training times: logit-normal (SD3, m 0, s 1) or uniform


@dataclass
class DataConfig:
    name: str = "shapes"  # mnist | fashion-mnist | cifar10 | shapes | path to an image folder
    root: str | None = None  # None: $DIFFCLI_DATA_ROOT, else the user cache dir
    image_size: int | None = bounded(None, IMAGE_SIZE)  # None: the dataset's own size
    flip: bool | None = None  # None: on for cifar10 and image folders, off for digits and shapes
    limit: int | None = bounded(None, AT_LEAST_ONE)  # use only the first N images (quick experiments, tests)


@dataclass
class TrainConfig:
    # The `small` preset's. Batch 64 (lr 1e-3·√2) trains 1.25-1.35x batch 32's images per CPU second; at
    # equal time it won on CIFAR-10 and shapes, level on MNIST (docs/results.md, "Where 10 CPU-minutes run out").
    preset: str = "small"
    batch_size: int = bounded(64, AT_LEAST_ONE)
    lr: float = bounded(1.4e-3, POSITIVE)
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to 0 at the last step)
    warmup_steps: int = bounded(100, NON_NEGATIVE)
    weight_decay: float = bounded(0.0, NON_NEGATIVE)
    grad_clip: float = bounded(1.0, NON_NEGATIVE)  # 0: off
    ema_decay: float = bounded(0.999, SHARE)
    # Post-hoc EMA (EDM2): the two power-function EMAs saved every N steps, from which `diffcli ema` makes
    # the model of any EMA length afterwards (posthoc.py); 0: no snapshots.
    ema_snapshot_every: int = bounded(0, NON_NEGATIVE)
    label_dropout: float = bounded(0.1, SHARE)  # share of labels replaced by "no label" (for guidance)
    # Min-SNR-γ loss weighting (Hang et al. 2023), their γ = 5: on shapes it turned 3-minute CPU runs from
    # colour blobs into single objects. 0: off, the plain MSE of DDPM.
    min_snr_gamma: float = bounded(5.0, NON_NEGATIVE)
    # Stopping: whichever comes first; with none of them set, `epochs` defaults to 10.
    epochs: float | None = bounded(None, POSITIVE)
    max_steps: int | None = bounded(None, AT_LEAST_ONE)
    minutes: float | None = bounded(None, POSITIVE)
    on_nonfinite: str = "stop"  # NaN/inf loss: "stop" (keep the last checkpoint) or "rollback" (to the last good state)
    sample_every: int = bounded(1000, AT_LEAST_ONE)  # steps between sample grids (and checkpoints)
    grid_steps: int = bounded(25, AT_LEAST_ONE)  # DDIM steps for those grids: cheap, good enough to judge progress
    seed: int = bounded(0, SEED)
    device: str = "auto"
    compile: bool | None = None  # torch.compile the U-Net; None: on for CUDA only (compiling.py)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA and bf16-native CPUs, fp32 elsewhere), "fp32" or "bf16" (devices.py)
    log: str = "none"  # experiment trackers: none, tensorboard, wandb, or tensorboard,wandb (trackers.py)
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else W&B's own default


@dataclass
class DistillConfig:  # present only in a `diffcli distill` run: the student it makes (distill.py)
    teacher: str = ""  # the teacher's model.safetensors, as an absolute path
    teacher_sha256: str = ""  # its file's hash as trained (checkpoint.trained_sha256): a resume refuses a changed teacher
    steps: int = bounded(4, AT_LEAST_ONE)  # the student's network evaluations per image
    guidance: float | None = bounded(None, NON_NEGATIVE)  # the teacher's weight folded in; None: the sampling default
    teacher_steps: int = bounded(32, AT_LEAST_ONE)  # the teacher's DDIM path the student learns: its ceiling (docs/distill.md)

    def student(self) -> Student:
        return Student(self.steps, DEFAULT_GUIDANCE if self.guidance is None else self.guidance)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None  # None: a model trained on data, not distilled

    def images_seen(self, step: int) -> int | None:  # None: no steps recorded (an import); spec.default_guidance
        return step * self.train.batch_size or None


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig, "distill": DistillConfig}

PRESETS: dict[str, dict[str, dict]] = {  # the architecture, and the optimiser settings that go with its size
    # Seconds on a CPU: for tests and smoke runs, not for pictures.
    "tiny": {
        "model": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), head_channels=8, patch_size=1),
        "train": dict(batch_size=16, lr=1e-3, warmup_steps=10, ema_decay=0.99, sample_every=50, grid_steps=4),
    },
    # MNIST / shapes on a laptop CPU: the dataclass defaults above.
    "small": {"model": {}, "train": {}},
    # The DDPM CIFAR-10 network (Ho et al. 2020, App. B): 128 channels, mult 1,2,2,2,
    # two blocks per level, attention at 16x16, dropout 0.1, additive time embedding:
    # 35.7M parameters (scale-shift would add 2.6M).
    "base": {
        "model": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                      head_channels=64, dropout=0.1, scale_shift=False, patch_size=1),
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
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise UserError(f"config key '{where}' must be {'true or false' if hint is bool else 'a string'}, got {value!r}.")
        return value
    if hint in (int, float):
        value = yaml_number(value, hint)
        if isinstance(value, bool) or not isinstance(value, (int, float) if hint is float else int):
            raise UserError(f"config key '{where}' must be {'a number' if hint is float else 'an integer'}, got {value!r}.")
        return hint(value)
    raise TypeError(f"unsupported field type {hint} for {where}")


def _apply(obj, values: dict, section: str):
    if not isinstance(values, dict):
        raise UserError(f"config section '{section}' must be a mapping of keys to values.")
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key '{section}.{key}'; known keys in '{section}': {', '.join(hints)}.")
        setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def apply_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """Apply a nested dict {section: {key: value}} onto `cfg` in place, validating types."""
    if not isinstance(overrides, dict):
        raise UserError("a config file must hold a mapping with sections model, diffusion, data, train.")
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'; known: {', '.join(SECTIONS)}.")
        if getattr(cfg, section) is None and values:  # an optional section (distill) appears when given
            setattr(cfg, section, SECTIONS[section]())
        if getattr(cfg, section) is not None:
            _apply(getattr(cfg, section), values or {}, section)
    return cfg


def preset_config(preset: str) -> RunConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of auto, {', '.join(PRESETS)}.")
    cfg = apply_overrides(RunConfig(), {s: dict(v) for s, v in PRESETS[preset].items()})
    cfg.train.preset = preset
    return cfg


def load_yaml(path: str | Path) -> dict:
    import yaml  # (here: `diffcli --help` reads no YAML)
    if not Path(path).is_file():
        raise UserError(f"config file '{path}' does not exist or is not a file.")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file '{path}' is not valid YAML ({type(e).__name__}).") from None
    return data or {}


def build_config(preset: str | None, config_file: str | None, cli: dict,
                 auto_preset: typing.Callable[[str], str] = lambda device: "small") -> RunConfig:
    """Defaults < preset < YAML file < options given; a --preset not the file's sets all presets set ("auto": the device's)."""
    file_values = load_yaml(config_file) if config_file else {}
    if not isinstance(file_values, dict):
        raise UserError(f"config file '{config_file}' must hold a mapping with sections model, diffusion, data, train.")
    file_train = file_values.get("train") or {}
    given, preset = preset, (file_train.get("preset") or "auto") if preset is None else preset  # ("": no preset, refused)
    if preset == "auto":
        preset = auto_preset((cli.get("train") or {}).get("device") or file_train.get("device") or "auto")
    if given not in (None, "auto", file_train.get("preset", preset)):  # a --preset beats the file's: all a preset sets
        set_by = {(s, k) for values in PRESETS.values() for s, keys in values.items() for k in keys}
        file_values = {s: {k: x for k, x in v.items() if (s, k) not in set_by} if isinstance(v, dict) else v for s, v in file_values.items()}
    cfg = apply_overrides(preset_config(preset), file_values)
    apply_overrides(cfg, {s: {k: v for k, v in vals.items() if v is not None} for s, vals in cli.items()})
    cfg.train.preset = preset
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every value checked once: the ranges declared on the fields (NaN and infinity
    refused), then what a single field cannot say; each message names the key."""
    from diffcli import flow, objective
    from diffcli.schedules import SCHEDULES

    for section in SECTIONS:
        if getattr(cfg, section) is not None:
            check_fields(getattr(cfg, section), lambda key, s=section: f"{s}.{key}")
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    attention_widths = sorted({m.base_channels * c for i, c in enumerate(m.channel_mult) if i in (*m.attn_levels, len(m.channel_mult) - 1)})
    checks = [
        (len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult), "model.channel_mult must be a non-empty list of positive integers"),
        (all(0 <= lv < len(m.channel_mult) for lv in m.attn_levels), "model.attn_levels must be level indices below len(channel_mult)"),
        (not m.norm_groups or m.base_channels % m.norm_groups == 0, "model.norm_groups must divide model.base_channels"),
        (all(w % max(1, w // m.head_channels) == 0 for w in attention_widths),  # unet.Attention's heads must split them evenly
         f"model.head_channels must split the widths where attention runs ({', '.join(map(str, attention_widths))}) into equal heads"),
        (d.schedule in SCHEDULES, f"diffusion.schedule must be one of {', '.join(SCHEDULES)}"),
        (d.prediction in ("eps", "v"), "diffusion.prediction must be 'eps' or 'v'"),
        (d.objective in objective.OBJECTIVES, f"diffusion.objective must be one of {', '.join(objective.OBJECTIVES)}"),
        (d.time_sampling in flow.TIME_SAMPLINGS, f"diffusion.time_sampling must be one of {', '.join(flow.TIME_SAMPLINGS)}"),
        (t.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
        (t.on_nonfinite in ("stop", "rollback"), "train.on_nonfinite must be 'stop' or 'rollback'"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"),
        (set(t.log.split(",")) <= {"none", "tensorboard", "wandb"}, "train.log must be none, tensorboard, wandb or tensorboard,wandb"),
        (t.grid_steps <= d.timesteps, "train.grid_steps must be between 1 and diffusion.timesteps"),
        (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:"), "train.device must be auto, cpu, cuda or mps"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML and JSON."""
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
            for name in SECTIONS if getattr(cfg, name) is not None}


def from_dict(values: dict) -> RunConfig:
    return apply_overrides(RunConfig(), values)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    import yaml

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


# --- settings that depend on the data or on the run being resumed ------------------

UNFLIPPED = ("shapes", "mnist", "fashion-mnist")  # digits and arrows have a handedness


def fit_to_data(cfg: RunConfig, channels: int, size: int, num_classes: int) -> None:
    """Fill in the model's data-dependent fields and the data defaults, then check that
    the U-Net's patches tile this image size (any size halves: unet.py)."""
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = size, channels, num_classes
    if cfg.data.flip is None:
        cfg.data.flip = cfg.data.name not in UNFLIPPED
    if size % (p := cfg.model.patch_size):
        raise UserError(f"image size {size} is not divisible by the U-Net's patch size {p}; "
                        f"pass --image-size with a multiple of {p}, or set model.patch_size: 1.")
    validate(cfg)
