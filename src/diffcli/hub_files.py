"""diffusers pipeline folders on disk: `export` (`diffcli export --to diffusers`) writes one
for a diffcli model, `import_pipeline` (`diffcli import`) reads one into a diffcli model
file. What maps to what is `hub.py`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffcli.checkpoint import valid_tuned
from diffcli.checks import is_number
from diffcli.config import RunConfig
from diffcli.errors import UserError
from diffcli.hub import (DIFFUSERS_VERSION, PREDICTIONS, SCHEDULER_NUMBERS, UNET2D_NUMBERS, UNET_WEIGHTS, check_numbers,
                         diffusion_config, from_diffusers, model_config, pipeline_classes, read_json, scheduler_config,
                         to_diffusers, unet_config, write_json)
from diffcli.spec import LabelReading, default_guidance

IMPORTED = "imported"  # the preset an imported model's config names: it was not trained here


# --- out ----------------------------------------------------------------------------

def export(ckpt: Path, out: Path) -> tuple[dict, str]:
    """Write the diffusers pipeline folder `out` for the diffcli model `ckpt`; returns the UNet
    config and the scheduler's class."""
    from diffcli.checkpoint import load_model, save_tensors

    model, cfg, meta = load_model(ckpt)
    if cfg.distill is not None:
        raise UserError("a distilled student samples only with its own few steps, which no diffusers scheduler knows; "
                        f"export its teacher ({cfg.distill.teacher}).")
    unet = unet_config(model, cfg.model)
    names, k = meta["class_names"], cfg.model.num_classes
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    write_json(out / "unet" / "config.json", unet)
    save_tensors(out / "unet" / UNET_WEIGHTS, to_diffusers(model.state_dict(), cfg.model), {"format": "pt"})
    write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    pipeline, scheduler = pipeline_classes(cfg)
    write_json(out / "model_index.json", {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
                                          "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DModel"]})
    # what the guidance rule reads of its training, so that an import samples with the same default weight
    trained = {"step": meta["step"], "batch_size": cfg.train.batch_size, "label_knowledge": meta["label_knowledge"],
               "label_gain": meta["label_gain"], "tuned_guidance": _exported(meta["tuned_guidance"])}
    write_json(out / "class_names.json", {"class_names": names, "null_label": k if k else None, "diffcli_training": trained})
    (out / "README.md").write_text(model_card(cfg, names, ckpt, default_guidance(model.trained)))
    return unet, scheduler


def _exported(tuned: dict | None) -> dict | None:
    """A tuned-guidance entry without the hashes of the diffcli file it was tuned in: the import is another file."""
    return None if tuned is None else {k: v for k, v in tuned.items() if not k.endswith("_sha256")}


def model_card(cfg: RunConfig, names: list[str], ckpt: Path, guidance: float) -> str:
    k = cfg.model.num_classes
    labels = (f"Class labels 0..{k - 1} ({', '.join(names[:10])}{' ...' if k > 10 else ''}); label {k} is \"no label\", "
              "for classifier-free guidance.") if k else "Unconditional: call the UNet without class labels."
    guided = ("        both = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, torch.full_like(y, %d)])).sample\n"
              "        cond, uncond = both.chunk(2)\n        out = uncond + %g * (cond - uncond)  # the weight diffcli samples it with\n" % (k, guidance)
              if k else "        out = unet(x, t).sample\n")
    flow = cfg.diffusion.objective == "flow"
    learned = ("flow matching (the UNet predicts the velocity noise - image at timestep t = s·T)" if flow else
               f"{cfg.diffusion.schedule} schedule, T = {cfg.diffusion.timesteps}, {PREDICTIONS[cfg.diffusion.prediction]} prediction")
    pipeline, scheduler = pipeline_classes(cfg)
    steps = ("scheduler.set_timesteps(sigmas=[1 - i / 50 for i in range(50)])  # diffcli's 50 Euler steps" if flow
             else "scheduler.set_timesteps(50)")
    step = "scheduler.step(out, t, x).prev_sample" if flow else "scheduler.step(out, t, x, use_clipped_model_output=True).prev_sample"
    return f"""# {ckpt.parent.name or ckpt.stem}: a diffcli model in the diffusers format

Trained with [diffcli](https://github.com/) on `{cfg.data.name}` ({cfg.model.image_size}x{cfg.model.image_size},
{cfg.model.in_channels} channel(s)); {learned}. {labels}

```python
import torch
from diffusers import {scheduler}, UNet2DModel

unet = UNet2DModel.from_pretrained("THIS_FOLDER", subfolder="unet").eval()
scheduler = {scheduler}.from_pretrained("THIS_FOLDER", subfolder="scheduler")
{steps}
x = torch.randn(8, {cfg.model.in_channels}, {cfg.model.image_size}, {cfg.model.image_size}, generator=torch.Generator().manual_seed(0))
y = torch.arange(8) % {max(k, 1)}
with torch.no_grad():
    for t in scheduler.timesteps:
{guided}        x = {step}  # as diffcli sample --sampler {"euler" if flow else "ddim"}{" --no-clip" if flow else ""}
images = (x.clamp(-1, 1) + 1) / 2  # pixels in [0, 1]
```
{"" if k else f"An unconditional model also runs in `{pipeline}.from_pretrained('THIS_FOLDER')`."}
"""


def unet_weights(folder: Path) -> dict:
    """The UNet's tensors from `diffusion_pytorch_model.safetensors`, else from the `.bin` through
    torch.load(weights_only=True), which refuses any pickled code."""
    from safetensors.torch import load_file

    if (folder / UNET_WEIGHTS).is_file():
        try:
            return load_file(str(folder / UNET_WEIGHTS))
        except Exception as e:  # safetensors' own error types differ between its versions
            raise UserError(f"'{folder / UNET_WEIGHTS}' could not be read: it looks truncated or damaged "
                            f"({str(e).splitlines()[0]}).") from None
    if (folder / "diffusion_pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"'{folder / 'diffusion_pytorch_model.bin'}' holds more than weights, or is damaged "
                            f"({type(e).__name__}); diffcli never runs pickled code.") from None
    raise UserError(f"'{folder}' has no {UNET_WEIGHTS} (nor a .bin).")


def import_pipeline(folder: Path, out: Path) -> RunConfig:
    """Write diffcli's model file `out` for the diffusers pipeline folder `folder`."""
    from diffcli.checkpoint import save_model
    from diffcli.config import to_dict, validate
    from diffcli.unet import UNet

    read_json(folder / "model_index.json", folder)
    unet_file, sched_file = folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json"
    unet, sched = read_json(unet_file, folder), read_json(sched_file, folder)
    check_numbers(unet, UNET2D_NUMBERS, unet_file)
    check_numbers(sched, SCHEDULER_NUMBERS, sched_file)
    labels = read_json(folder / "class_names.json", folder) if (folder / "class_names.json").is_file() else {}
    if unet.get("num_class_embeds") and labels.get("null_label") != unet["num_class_embeds"] - 1:
        raise UserError("this UNet2DModel has class labels but no \"no label\" class (diffcli's exports name it in "
                        "class_names.json), so classifier-free guidance cannot run on it.")
    cfg = RunConfig(diffusion=diffusion_config(sched))
    cfg.model = model_config(unet, unet["num_class_embeds"] - 1 if unet.get("num_class_embeds") else 0)
    cfg.data.name, cfg.train.preset = str(folder.resolve()), IMPORTED  # where it came from: no training data
    validate(cfg)
    net = UNet(cfg.model)
    try:
        net.load_state_dict(from_diffusers(unet_weights(folder / "unet"), cfg.model))
    except (RuntimeError, KeyError) as e:  # torch's message: a heading line, then one line a weight
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        raise UserError(f"the weights in '{folder / 'unet'}' do not fit their config.json ({detail.rstrip('.')}).") from None
    names = labels.get("class_names") or [str(i) for i in range(cfg.model.num_classes)]
    step, reading, tuned = _training(labels.get("diffcli_training"), cfg)
    save_model(out, net.state_dict(), to_dict(cfg), names, step, 0.0, reading, tuned)
    return cfg


def _training(entry, cfg: RunConfig) -> tuple[int, LabelReading | None, dict | None]:
    """(step, label reading, tuned guidance) from a diffcli export's class_names.json, with the
    batch size put in `cfg` (the images seen are step x batch): what the guidance rule reads.
    Step 0 and no reading, the rule's "training unknown", for a folder from elsewhere or an entry
    that is not numbers; a tuned weight (tuning.py) holds for the same weights in either format."""
    entry = entry if isinstance(entry, dict) else {}
    step, batch, knowledge, gain = (entry.get(k) for k in ("step", "batch_size", "label_knowledge", "label_gain"))
    number = lambda v: is_number(v) and math.isfinite(v)  # noqa: E731
    tuned = valid_tuned(entry.get("tuned_guidance"))
    if not (is_number(step, int) and step >= 0 and is_number(batch, int) and batch >= 1):
        return 0, None, tuned
    cfg.train.batch_size = batch
    return step, LabelReading(knowledge, gain if number(gain) else None) if number(knowledge) else None, tuned
