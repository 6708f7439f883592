"""The diffusers folder format, out (`diffcli export`) and in (`diffcli import`).

A diffusers pipeline folder holds `model_index.json`, `unet/` (`config.json` and
`diffusion_pytorch_model.safetensors`, what `UNet2DModel.from_pretrained` reads) and
`scheduler/` (`scheduler_config.json`). Both directions are plain JSON and safetensors:
diffusers itself is not needed to write or read them.

diffcli's U-Net and diffusers' `UNet2DModel` (down blocks `DownBlock2D`/`AttnDownBlock2D`,
`UNetMidBlock2D`, positional time embedding, class embedding added to it) are the same
network where diffusers can say what diffcli does; `unet_config` refuses the rest in one
sentence naming the difference. The weights map one to one, except that diffcli's
attention computes q, k and v with one 1x1 convolution where diffusers has three linear
layers, and that an unconditional diffcli model's "no label" embedding (always added)
is folded into the time embedding's last bias, since diffusers adds none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffcli.config import ModelConfig, RunConfig
from diffcli.errors import UserError

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version the tests load the folders with
RES = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # diffcli's name: diffusers' name
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


def modules(m: ModelConfig):
    """(diffcli module, diffusers module, kind) for every weight-holding part of the U-Net;
    kind is "plain" (same tensors), "res" (a residual block) or "attn" (self-attention)."""
    yield from (("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
                ("class_emb", "class_embedding", "plain"), ("conv_in", "conv_in", "plain"))
    levels = len(m.channel_mult)
    for i in range(levels):
        for j in range(m.num_res_blocks):
            yield f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}", "res"
            if i in m.attn_levels:
                yield f"down.{i}.attns.{j}", f"down_blocks.{i}.attentions.{j}", "attn"
        if i < levels - 1:
            yield f"downsample.{i}", f"down_blocks.{i}.downsamplers.0.conv", "plain"
    yield from (("mid1", "mid_block.resnets.0", "res"), ("mid_attn", "mid_block.attentions.0", "attn"),
                ("mid2", "mid_block.resnets.1", "res"))
    for k, i in enumerate(reversed(range(levels))):  # diffcli's up[k] works at level i
        for j in range(m.num_res_blocks + 1):
            yield f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}", "res"
            if i in m.attn_levels:
                yield f"up.{k}.attns.{j}", f"up_blocks.{k}.attentions.{j}", "attn"
        if k < levels - 1:
            yield f"upsample.{k}", f"up_blocks.{k}.upsamplers.0.conv", "plain"
    yield from (("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain"))


def to_diffusers(ours: dict, m: ModelConfig) -> dict:
    """diffcli's state dict as `UNet2DModel`'s."""
    theirs = {}
    for a, b, kind in modules(m):
        for name, value in ((k[len(a) + 1:], v) for k, v in ours.items() if k.startswith(a + ".")):
            part, _, param = name.rpartition(".")
            if kind == "res":
                theirs[f"{b}.{RES[part]}.{param}"] = value
            elif kind == "attn" and part == "qkv":
                for piece, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                    theirs[f"{b}.{piece}.{param}"] = chunk.flatten(1) if param == "weight" else chunk
            elif kind == "attn":
                target = {"norm": "group_norm", "proj": "to_out.0"}[part]
                theirs[f"{b}.{target}.{param}"] = value.flatten(1) if part == "proj" and param == "weight" else value
            else:
                theirs[f"{b}.{name}"] = value
    if m.num_classes == 0:  # diffusers adds no class embedding: fold the one diffcli always adds
        null = theirs.pop("class_embedding.weight")[0]
        theirs["time_embedding.linear_2.bias"] = theirs["time_embedding.linear_2.bias"] + null
    return {k: v.contiguous() for k, v in theirs.items()}


LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def from_diffusers(theirs: dict, m: ModelConfig) -> dict:
    """`UNet2DModel`'s state dict as diffcli's (the inverse of `to_diffusers`). The attention
    names of early diffusers files (google/ddpm-*: query, key, value, proj_attn) are read
    as the current ones, as diffusers itself renames them on loading."""
    for old, new in LEGACY_ATTENTION.items():
        theirs = {k.replace(old, new): v for k, v in theirs.items()}
    ours = {}
    for a, b, kind in modules(m):
        if kind == "res":
            for part, piece in RES.items():
                for param in ("weight", "bias"):
                    if f"{b}.{piece}.{param}" in theirs:
                        ours[f"{a}.{part}.{param}"] = theirs[f"{b}.{piece}.{param}"]
        elif kind == "attn":
            for param in ("weight", "bias"):
                qkv = torch.cat([theirs[f"{b}.{p}.{param}"] for p in ("to_q", "to_k", "to_v")])
                ours[f"{a}.qkv.{param}"] = qkv[:, :, None, None] if param == "weight" else qkv
                proj = theirs[f"{b}.to_out.0.{param}"]
                ours[f"{a}.proj.{param}"] = proj[:, :, None, None] if param == "weight" else proj
                ours[f"{a}.norm.{param}"] = theirs[f"{b}.group_norm.{param}"]
        else:
            for param in ("weight", "bias"):
                if f"{b}.{param}" in theirs:
                    ours[f"{a}.{param}"] = theirs[f"{b}.{param}"]
    if m.num_classes == 0 and "class_emb.weight" not in ours:  # the "no label" row adds nothing
        ours["class_emb.weight"] = torch.zeros(1, theirs["time_embedding.linear_2.bias"].shape[0])
    return ours


def unet_config(net: torch.nn.Module, m: ModelConfig) -> dict:
    """The `UNet2DModel` config of diffcli's `net`, or a UserError naming what diffusers cannot say."""
    groups = sorted({mod.num_groups for mod in net.modules() if isinstance(mod, torch.nn.GroupNorm)})
    widths = sorted({mod.qkv.in_channels for mod in net.modules() if hasattr(mod, "qkv")})
    if m.patch_size != 1:
        raise UserError(f"UNet2DModel has no patches: this model was trained with patch_size {m.patch_size}.")
    if m.image_size % 2 ** (halvings := len(m.channel_mult) - 1):
        raise UserError(f"UNet2DModel doubles each level's size back exactly, so its image size must halve evenly "
                        f"{halvings} times, and this model's {m.image_size} does not.")
    if len(groups) > 1:
        raise UserError(f"UNet2DModel has one GroupNorm group count for every layer, and this model's vary with their width "
                        f"({', '.join(map(str, groups))}: diffcli keeps 4 channels a group in narrow layers); the base "
                        f"preset (32 throughout) exports, and so does a model trained with model.norm_groups set.")
    if any(w % m.head_channels for w in widths):
        raise UserError(f"UNet2DModel splits attention into heads of attention_head_dim channels, and this model's "
                        f"{m.head_channels} do not divide its attention widths ({', '.join(map(str, widths))}).")
    attn = ["Attn" if i in m.attn_levels else "" for i in range(len(m.channel_mult))]
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": m.image_size,
            "in_channels": m.in_channels, "out_channels": m.in_channels, "center_input_sample": False,
            "time_embedding_type": "positional", "flip_sin_to_cos": m.flip_sin_to_cos, "freq_shift": m.freq_shift,
            "down_block_types": [f"{a}DownBlock2D" for a in attn], "up_block_types": [f"{a}UpBlock2D" for a in attn[::-1]],
            "mid_block_type": "UNetMidBlock2D", "block_out_channels": [m.base_channels * c for c in m.channel_mult],
            "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1, "downsample_padding": m.downsample_padding,
            "downsample_type": "conv", "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu",
            "attention_head_dim": m.head_channels, "norm_num_groups": groups[0], "attn_norm_num_groups": groups[0],
            "norm_eps": m.norm_eps, "resnet_time_scale_shift": "scale_shift" if m.scale_shift else "default",
            "add_attention": True, "class_embed_type": None, "num_class_embeds": m.num_classes + 1 if m.num_classes else None}


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_PLAIN = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}  # what diffcli's flow is
# diffusers' schedulers that read a model through DDPM's discrete betas (beta_schedule, beta_start, beta_end): only these
# describe a model diffcli can run. The others (EDM's, score-SDE VE, consistency models) have no betas to read.
BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
                   "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                   "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                   "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
                   "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "TCDScheduler", "LCMScheduler")


def pipeline_classes(cfg: RunConfig) -> tuple[str, str]:
    """(pipeline, scheduler) of an export; a flow model's pipeline is DDPMPipeline, since
    DDIMPipeline passes its scheduler DDIM's eta, which the flow scheduler's step lacks."""
    return ("DDPMPipeline", FLOW_SCHEDULER) if cfg.diffusion.objective == "flow" else ("DDIMPipeline", "DDIMScheduler")


def scheduler_config(cfg: RunConfig) -> dict:
    """A `DDIMScheduler` config with diffcli's schedule, T, prediction, clipping and trailing spacing;
    for a flow model a `FlowMatchEulerDiscreteScheduler`, whose timesteps s·T are the network's time input."""
    d = cfg.diffusion
    if d.objective == "flow":
        return {"_class_name": FLOW_SCHEDULER, "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": d.timesteps,
                "shift": 1.0, **FLOW_PLAIN}
    scale = 1000 / d.timesteps  # diffcli's linear schedule keeps DDPM's total noise at any T (schedules.py)
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": d.timesteps,
            "beta_schedule": BETA_SCHEDULES[d.schedule], "beta_start": 1e-4 * scale, "beta_end": 0.02 * scale,
            "prediction_type": PREDICTIONS[d.prediction], "clip_sample": True, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing", "rescale_betas_zero_snr": False}


def write_json(path: Path, value: dict) -> None:
    from diffcli.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path: Path, pipeline: Path) -> dict:
    """A JSON object from a file of the pipeline folder `pipeline` (named when it is missing)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing: is '{pipeline}' a diffusers pipeline folder?") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON.") from None
    if not isinstance(value, dict):
        raise UserError(f"'{path}' does not hold a JSON object.")
    return value


# --- in: what diffcli's U-Net can express ---------------------------------------------

UNET2D_DEFAULTS = {  # UNet2DModel's defaults (diffusers 0.42), for keys an older config.json leaves out
    "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "in_channels": 3, "out_channels": 3}


# The numbers in the configs read here, and what each must be: a value of another type is
# refused naming its file and key, before any arithmetic on it.
def _int(v) -> bool:
    return type(v) is int  # not bool, not a float that happens to be whole


def _ints(v) -> bool:
    return isinstance(v, list) and bool(v) and all(map(_int, v))


INT, NUMBER, INTS = ("an integer", _int), ("a number", lambda v: type(v) in (int, float)), ("a list of integers", _ints)
INT_OR_NULL = ("an integer or null", lambda v: v is None or _int(v))
UNET2D_NUMBERS = {"in_channels": INT, "out_channels": INT, "layers_per_block": INT, "norm_num_groups": INT,
                  "downsample_padding": INT, "freq_shift": INT, "dropout": NUMBER, "norm_eps": NUMBER,
                  "attention_head_dim": INT_OR_NULL, "num_class_embeds": INT_OR_NULL, "block_out_channels": INTS,
                  "sample_size": ("an integer or a list of integers", lambda v: _int(v) or _ints(v))}
SCHEDULER_NUMBERS = {"num_train_timesteps": INT, "beta_start": NUMBER, "beta_end": NUMBER}


def check_numbers(values: dict, kinds: dict, path: Path) -> None:
    for key, (want, fits) in kinds.items():
        if key in values and not fits(values[key]):
            raise UserError(f"'{path}' has {values[key]!r} for \"{key}\", which must be {want}.")


def model_config(unet: dict, num_classes: int) -> ModelConfig:
    """diffcli's ModelConfig for a `UNet2DModel` config (its numbers checked: check_numbers),
    or a UserError naming what diffcli cannot express."""
    c = {**UNET2D_DEFAULTS, **unet}
    down, up, widths = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    base = widths[0]
    same = {"time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False, "add_attention": True,
            "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
            "class_embed_type": None, "time_embedding_dim": None, "out_channels": c["in_channels"]}
    for key, wanted in same.items():
        if c[key] != wanted and not (key == "time_embedding_dim" and c[key] == 4 * base):
            raise UserError(f"diffcli's U-Net cannot express this UNet2DModel: its {key} is {c[key]!r}, diffcli's is {wanted!r}.")
    kinds = [b.replace("DownBlock2D", "") for b in down]
    if set(kinds) - {"", "Attn"} or [b.replace("UpBlock2D", "") for b in up] != kinds[::-1] or any(w % base for w in widths):
        raise UserError(f"diffcli's U-Net cannot express these blocks ({', '.join(down)} / {', '.join(up)}, widths "
                        f"{widths}): it has DownBlock2D or AttnDownBlock2D per level, the up blocks mirroring them, "
                        f"and widths that are multiples of the first.")
    attn = tuple(i for i, k in enumerate(kinds) if k)
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]) or (c["attn_norm_num_groups"] is None
                                                                       and c["resnet_time_scale_shift"] != "default"):
        raise UserError("diffcli's attention layers have the GroupNorm of the blocks around them; this UNet2DModel's differ.")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise UserError(f"diffcli's U-Net cannot express resnet_time_scale_shift {c['resnet_time_scale_shift']!r}.")
    size = c["sample_size"] if isinstance(c["sample_size"], int) else c["sample_size"][0]
    heads = c["attention_head_dim"] or max([widths[i] for i in attn] + [widths[-1]])  # None: one head everywhere
    return ModelConfig(base_channels=base, channel_mult=tuple(w // base for w in widths), num_res_blocks=c["layers_per_block"],
                       attn_levels=attn, head_channels=heads, dropout=float(c["dropout"]),
                       scale_shift=c["resnet_time_scale_shift"] == "scale_shift", norm_eps=float(c["norm_eps"]),
                       downsample_padding=int(c["downsample_padding"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
                       freq_shift=int(c["freq_shift"]), norm_groups=int(c["norm_num_groups"]), patch_size=1, image_size=size,
                       in_channels=c["in_channels"], num_classes=num_classes)


def diffusion_config(sched: dict):
    """diffcli's DiffusionConfig for a diffusers scheduler config, or a UserError."""
    from diffcli.config import DiffusionConfig

    T = int(sched.get("num_train_timesteps", 1000))
    name = sched.get("_class_name")
    if name not in (*BETA_SCHEDULERS, FLOW_SCHEDULER, None):  # None: a hand-written config, read as DDPM's
        raise UserError(f"diffcli reads models whose scheduler is DDPM's family (DDPM, DDIM, Euler, DPM-Solver, ...) or "
                        f"{FLOW_SCHEDULER}; this one's is {name!r}.")
    if name == FLOW_SCHEDULER:
        odd = [key for key, plain in FLOW_PLAIN.items() if sched.get(key, plain) != plain]
        if odd:
            raise UserError(f"diffcli's flow models sample on plain flow times; this scheduler sets {', '.join(odd)}.")
        return DiffusionConfig(objective="flow", timesteps=T)  # its shift is a sampling choice: `--shift`
    kind = {v: k for k, v in BETA_SCHEDULES.items()}.get(sched.get("beta_schedule", "linear"))
    linear_ok = all(abs(float(sched.get(key, dflt)) - dflt * 1000 / T) <= 1e-9 for key, dflt in (("beta_start", 1e-4), ("beta_end", 0.02)))
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(sched.get("prediction_type", "epsilon"))
    if kind is None or sched.get("trained_betas") or sched.get("rescale_betas_zero_snr") or (kind == "linear" and not linear_ok):
        raise UserError(f"diffcli's schedules are DDPM's linear betas (1e-4 to 0.02 at T = 1000) and the cosine one "
                        f"(squaredcos_cap_v2); this scheduler has {sched.get('beta_schedule')!r} from "
                        f"{sched.get('beta_start')} to {sched.get('beta_end')}.")
    if prediction is None:
        raise UserError(f"diffcli's models predict epsilon or v; this one predicts {sched.get('prediction_type')!r}.")
    return DiffusionConfig(schedule=kind, timesteps=T, prediction=prediction)
