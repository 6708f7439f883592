"""`diffcli export` and `diffcli import`: a model to and from the diffusers folder format."""

from pathlib import Path
from shlex import quote
from typing import Annotated

import typer

from diffcli.cli._common import Ckpt, console, writing
from diffcli.errors import UserError


def export(
    ckpt: Ckpt,
    to: Annotated[str, typer.Option(help="The format to write: diffusers (UNet2DModel + DDIMScheduler, or FlowMatchEulerDiscreteScheduler for a flow model).")] = "diffusers",
    out: Annotated[Path, typer.Option(help="The pipeline folder to write.")] = Path("diffusers-model"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that is not empty, replacing its files.")] = False,
):
    """Write a model as a diffusers pipeline folder (unet/, scheduler/, model_index.json, a model card)."""
    if to != "diffusers":
        raise UserError(f"--to takes diffusers, got '{to}'.")
    from diffcli import outputs
    from diffcli.hub_files import export as write

    outputs.check({"--ckpt": ckpt}, [outputs.Output("--out", out, outputs.MODEL_FOLDER)], overwrite)

    with writing(out):
        unet, scheduler = write(ckpt, out)
    console.print(f"wrote [cyan]{out}[/]: UNet2DModel ({', '.join(unet['down_block_types'])}; "
                  f"{unet['block_out_channels']}) and {scheduler}; see {out / 'README.md'} to sample it with diffusers",
                  highlight=False)


def import_(
    folder: Annotated[Path, typer.Argument(help="A diffusers pipeline folder: model_index.json, unet/, scheduler/.")],
    out: Annotated[Path, typer.Option(help="The diffcli model file to write.")] = Path("imported.safetensors"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
):
    """Read a diffusers pipeline folder whose UNet2DModel diffcli's U-Net can express into one model file."""
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a folder; give a diffusers pipeline folder (with model_index.json).")
    from diffcli import outputs
    from diffcli.hub_files import import_pipeline

    outputs.check({"the pipeline folder": folder}, [outputs.Output("--out", out, outputs.MODEL)], overwrite)

    with writing(out):
        cfg = import_pipeline(folder, out)
    m, d = cfg.model, cfg.diffusion
    kind = f"{m.num_classes} classes" if m.num_classes else "unconditional"
    from diffcli.objective import of

    console.print(f"wrote [cyan]{out}[/]: {m.base_channels} channels x {list(m.channel_mult)}, {kind}, {of(d).describe()}; "
                  f"next: diffcli sample --ckpt {quote(str(out))} --label all", highlight=False)
