"""`diffcli edit` and `diffcli interpolate`: options, checks, one call into edit.py, print."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.checks import SEED, Range
from diffcli.cli._common import (BatchSize, Ckpt, Device, Eta, Guidance, ImageSeed, Sampler, Sets, Shift, Steps, console,
                                 parse_labels, parse_list, safe_name, writing)
from diffcli.errors import UserError
from diffcli.spec import EDIT_GUIDANCE, EDIT_STRENGTH, JUMPS, SamplerSpec


def _load(ckpt: Path, device: str):
    from diffcli.checkpoint import load_model
    from diffcli.devices import pick_device
    from diffcli.objective import of

    model, cfg, meta = load_model(ckpt, pick_device(device))
    return model, of(cfg.diffusion), cfg, meta["class_names"]


def _one_label(text: str, class_names: list[str], option: str = "--label") -> int:
    labels = parse_labels(text, class_names, option)
    if len(labels) != 1:
        raise UserError(f"{option} takes one class here, got '{text}'.")
    return labels[0]


def edit(
    images: Annotated[list[Path], typer.Argument(help="Images to edit: PNG/JPEG/GIF/BMP/WebP, cropped to a square and resized to the model's size.")],
    ckpt: Ckpt,
    label: Annotated[str, typer.Option(help="The class to edit toward (index or name; 'all' for an unconditional model).")],
    strength: Annotated[Optional[float], typer.Option(help=f"How far toward noise each image goes before it is redrawn: 0 keeps it, 1 draws anew (default {EDIT_STRENGTH:g})."), Range(0, 1)] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Inpaint instead: an image whose white part is redrawn and black part kept (resized like the inputs).")] = None,
    jumps: Annotated[Optional[int], typer.Option(help=f"With --mask: tries of every step (RePaint's resampling), so the seam is coherent; 1 = none (default {JUMPS})."), Range(1, 50)] = None,
    invert: Annotated[bool, typer.Option("--invert", help="A deterministic edit: DDIM-invert each image under --source-label, then sample it back under --label.")] = False,
    source_label: Annotated[Optional[str], typer.Option(help="With --invert: the class the images show (default: none, the unconditional model).")] = None,
    sampler: Sampler = "ddim",
    steps: Steps = None,
    guidance: Annotated[Optional[float], typer.Option(help=f"Classifier-free guidance weight (default: {EDIT_GUIDANCE:g}, "
                                                           f"enough to change the class; with --mask, sample's)."),
                        Sets(SamplerSpec, "guidance")] = None,
    eta: Eta = 0.0,
    shift: Shift = 1.0,
    n: Annotated[Optional[int], typer.Option(help="Variations per image, each from its own seed (default: 4; 1 with --invert)."), Range(1, 64)] = None,
    seed: ImageSeed = 0,
    out: Annotated[Path, typer.Option(help="The sheet to write: one row per image (input, mask, results).")] = Path("edited.png"),
    save_individual: Annotated[Optional[Path], typer.Option(help="Also write every result as its own PNG into this folder.")] = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
):
    """Edit images with a trained model: image-to-image, inpainting (--mask) or inversion (--invert)."""
    if mask is not None and invert:
        raise UserError("--mask and --invert are two different edits; give one.")
    if strength is not None and (mask is not None or invert):
        raise UserError("--strength is for image-to-image; inpainting and --invert always start from noise.")
    if source_label is not None and not invert:
        raise UserError("--source-label goes with --invert.")
    if jumps is not None and mask is None:
        raise UserError("--jumps goes with --mask: it is how often inpainting retries each step.")
    if invert and n not in (None, 1):
        raise UserError("--invert is deterministic, so every variation would be the same: drop --n.")
    n = n or (1 if invert else 4)
    spec = SamplerSpec(sampler, steps, guidance, eta, shift=shift)
    from diffcli.outputs import FOLDER, IMAGE, Output, check

    check({"input image": images, "--mask": mask, "--ckpt": ckpt},
          [Output("--out", out, IMAGE), Output("--save-individual", save_individual, FOLDER)])
    import torch

    from diffcli import edit as E
    from diffcli.data import fit_image, fit_mask, read_image
    from diffcli.devices import describe, timed
    from diffcli.figures import edit_sheet
    from diffcli.files import save_image
    from diffcli.images import to_pil

    model, objective, cfg, class_names = _load(ckpt, device)
    dev = next(model.parameters()).device
    c, size = cfg.model.in_channels, cfg.model.image_size
    inputs = torch.stack([fit_image(read_image(p), c, size) for p in images])
    target = _one_label(label, class_names)
    spec = (spec if mask is not None else E.for_edit(spec, model)).resolve(objective.T, model.student, model.trained)  # inpainting: sample's guidance
    per_image = inputs.repeat_interleave(n, dim=0)
    labels, seeds = [target] * len(per_image), list(range(seed, seed + len(per_image)))
    common = dict(images=per_image, labels=labels, batch_size=batch_size)
    redraw = None if mask is None else fit_mask(read_image(mask), size)[None].expand(len(inputs), -1, -1, -1)
    args = (model, objective, spec)
    if invert:
        src = cfg.model.num_classes if source_label is None else _one_label(source_label, class_names, "--source-label")
        work = partial(E.invert, *args, source_labels=[src] * len(labels), **common)
    elif redraw is not None:
        work = partial(E.inpaint, *args, redraw=redraw.repeat_interleave(n, dim=0), seeds=seeds, jumps=JUMPS if jumps is None else jumps, **common)
    else:
        work = partial(E.img2img, *args, seeds=seeds, strength=EDIT_STRENGTH if strength is None else strength, **common)
    with console.status(f"editing {len(images)} image(s), {len(per_image)} result(s) with {spec.describe(model.student)} on "
                        f"{describe(dev)} ..."):
        results, seconds = timed(work, dev)
    sheet = edit_sheet(inputs, results, redraw)
    with writing(out):
        save_image(sheet, out)
    for i, (img, s) in enumerate(zip(results, seeds) if save_individual else ()):
        with writing(path := save_individual / f"{i:05d}_{safe_name(Path(images[i // n]).stem)}_seed{s}.png"):
            save_image(to_pil(img), path)
    mode = "inverted" if invert else "inpainted" if mask is not None else "edited"
    console.print(f"wrote [cyan]{out}[/]: {len(images)} image(s) {mode} toward "
                  f"{class_names[target] if class_names else 'the model'}, {len(results)} result(s), {spec.describe(model.student)}, "
                  f"{seconds:.1f} s on {describe(dev)}", highlight=False)


def interpolate(
    ckpt: Ckpt,
    label: Annotated[str, typer.Option(help="One class (with two --seeds), or two joined by a comma (with one seed) to morph between.")] = "0",
    seeds: Annotated[str, typer.Option(help="Two seeds to move between (one with two labels).")] = "0,1",
    frames: Annotated[int, typer.Option(help="Images from the first end to the last, both included."), Range(2, 200)] = 9,
    sampler: Sampler = "ddim",
    steps: Steps = None,
    guidance: Guidance = None,
    shift: Shift = 1.0,
    out: Annotated[Path, typer.Option(help="A .png strip or a .gif animation.")] = Path("interp.png"),
    batch_size: BatchSize = 64,
    device: Device = "auto",
):
    """Move between two seeds (slerp of their noise) or two labels, with a deterministic sampler."""
    if out.suffix.lower() not in (".png", ".gif"):
        raise UserError(f"--out must end in .png or .gif, got '{out.name}'.")
    from diffcli.outputs import IMAGE, Output, check

    check({"--ckpt": ckpt}, [Output("--out", out, IMAGE)])
    seed_list = parse_list(seeds, int, "--seeds", SEED)
    spec = SamplerSpec(sampler, steps, guidance, shift=shift)
    from diffcli import edit as E
    from diffcli.devices import describe, timed
    from diffcli.figures import animation
    from diffcli.files import save_image
    from diffcli.images import grid

    model, objective, cfg, class_names = _load(ckpt, device)
    labels = parse_labels(label, class_names)
    args, dev = (model, objective, spec), next(model.parameters()).device
    if len(labels) == 1 and len(seed_list) == 2:
        what = f"seeds {seed_list[0]} -> {seed_list[1]}"
        work = partial(E.between_seeds, *args, label=labels[0], seeds=tuple(seed_list), frames=frames, batch_size=batch_size)
    elif len(labels) == 2 and len(seed_list) == 1:
        what = f"{class_names[labels[0]]} -> {class_names[labels[1]]}, seed {seed_list[0]}"
        work = partial(E.between_labels, *args, labels=tuple(labels), seed=seed_list[0], frames=frames, batch_size=batch_size)
    else:
        raise UserError("give one --label with two --seeds, or two labels (--label a,b) with one seed.")
    if len(set(labels)) < len(labels) or len(set(seed_list)) < len(seed_list):
        raise UserError(f"the two ends are the same ({what}), so every frame would be the same image; give two different ones.")
    with console.status(f"sampling {frames} frames between {what} on {describe(dev)} ..."):
        images, seconds = timed(work, dev)
    with writing(out):
        animation(images, out) if out.suffix.lower() == ".gif" else save_image(grid(images, frames), out)
    console.print(f"wrote [cyan]{out}[/]: {frames} frames, {what}, {spec.resolve(objective.T, model.student, model.trained).describe(model.student)}, "
                  f"{seconds:.1f} s on {describe(dev)}", highlight=False)
