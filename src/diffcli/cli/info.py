"""`diffcli inspect` and `diffcli noise-preview`: look at files without a model running."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from diffcli.checks import IMAGE_SIZE, SEED, TIMESTEPS, Range
from diffcli.cli._common import AsJson, as_json_text, console, parse_list, writing
from diffcli.errors import UserError


def inspect(
    ckpt: Annotated[Path, typer.Argument(help="A .safetensors file written by diffcli, or a run folder.")],
    as_json: AsJson = False,
):
    """Tell what a checkpoint (or a run folder) holds; reads only file headers."""
    from diffcli.inspection import describe

    info = describe(ckpt)
    if as_json:
        print(as_json_text(info))
        return
    table = Table(title=str(ckpt), show_header=False, title_justify="left")
    for key, value in info.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key.replace("_", " "), text)
    console.print(table)


def noise_preview(
    image: Annotated[Optional[Path], typer.Argument(help="Any PNG/JPEG/GIF/BMP/WebP image (optional with --plot).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the strip.")] = Path("noise_preview.png"),
    plot: Annotated[Optional[Path], typer.Option(help="Also plot alpha_bar_t and log-SNR against t for the schedules (needs matplotlib).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Comma-separated timesteps to show, e.g. 0,50,100,250,500,999.")] = None,
    frames: Annotated[int, typer.Option(help="Evenly spaced frames from t=0 to T-1 (when --steps is not given)."), Range(1, 100)] = 8,
    schedule: Annotated[str, typer.Option(help="linear, cosine, or all (one row per schedule).")] = "cosine",
    timesteps: Annotated[int, typer.Option(help="Diffusion steps T."), TIMESTEPS] = 1000,
    image_size: Annotated[int, typer.Option(help="The image is center-cropped and resized to this size."), IMAGE_SIZE] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the noise."), SEED] = 0,
):
    """Show what the forward (noising) process does to an image, and plot the schedules."""
    from diffcli.schedules import SCHEDULES

    names = list(SCHEDULES) if schedule == "all" else [schedule]
    if any(s not in SCHEDULES for s in names):
        raise UserError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)} or all.")
    if steps:
        ts = parse_list(steps, int, "--steps")
        if bad := [t for t in ts if not 0 <= t < timesteps]:
            raise UserError(f"--steps must lie in 0..{timesteps - 1}; got {bad}.")
    else:
        from diffcli.preview import even_steps

        ts = even_steps(timesteps, frames)
    if image is None and plot is None:
        raise UserError("give an image to noise, or --plot FILE.png for the schedule plot.")
    from diffcli.outputs import FILE, IMAGE, Output, check

    # --plot is matplotlib's: .pdf and .svg too
    check({"input image": image}, [Output("--out", out if image is not None else None, IMAGE), Output("--plot", plot, FILE)])
    if plot is not None:
        from diffcli.plots import schedule_plot
        from diffcli.schedules import make_schedule

        with writing(plot):
            schedule_plot([make_schedule(name, timesteps) for name in SCHEDULES], plot)  # the plot compares them all
        console.print(f"wrote [cyan]{plot}[/]: alpha_bar_t and log-SNR for {', '.join(SCHEDULES)} (T={timesteps})", highlight=False)
        if image is None:
            return
    from diffcli.data import read_image
    from diffcli.files import save_image
    from diffcli.preview import noise_preview as draw

    img = read_image(image)
    with writing(out):
        save_image(draw(img, names, timesteps, ts, image_size, seed), out)
    console.print(f"wrote [cyan]{out}[/]: t = {', '.join(map(str, ts))} ({', '.join(names)}, T={timesteps})", highlight=False)
