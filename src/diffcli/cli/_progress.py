"""The progress bar every long command shows, and the one training and distillation
draw from their loop's reports, with Ctrl-C asking the loop to stop and save."""

from __future__ import annotations

import signal
import time
from shlex import quote

import typer
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.text import Text

from diffcli.cli._common import EXIT_INTERRUPTED, console, err_console


class Count(ProgressColumn):
    """n/N, or for a task made with by_time=True its seconds as times: 2:13/3:00."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text(f"{task.completed:.0f}")
        if task.fields.get("by_time"):
            return Text(f"{_clock(task.completed)}/{_clock(task.total)}", style="progress.download")
        return Text(f"{task.completed:.0f}/{task.total:.0f}", style="progress.download")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress(label: str):
    """The progress bar every long command shows: label, bar, n/N, a free text field
    (`info`), elapsed time and ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), Count(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)


class _Progress:
    """Draws the training loop's reports: a bar by steps, or by seconds for a --minutes run."""

    def __init__(self, bar):
        self.bar, self.task, self.by_time, self.t0, self.notices = bar, None, False, 0.0, set()

    def __call__(self, event: str, **info) -> None:
        from diffcli.devices import describe

        if event == "start":
            ranks = f" over {info['world']} processes ({info['batch'] // info['world']} each)" if info["world"] > 1 else ""
            console.print(f"device: [bold]{describe(info['device'])}[/], {info['precision']}; preset {info['preset']}, {info['params']:,} parameters, "
                          f"{info['objective']}; global batch {info['batch']}{ranks}"
                          + (f", {info['steps_per_epoch']} steps per epoch" if info["steps_per_epoch"] else "")
                          + (f"; budget {info['budget_s'] / 60:g} min" if info["budget_s"] else ""), highlight=False)
            self.by_time, self.t0 = not info["total_steps"], time.monotonic()
            total = info["budget_s"] if self.by_time else info["total_steps"]
            self.task = self.bar.add_task("train", total=total, completed=0 if self.by_time else info["step"], info="",
                                          by_time=self.by_time)
        elif event == "step":
            done = min(time.monotonic() - self.t0, self.bar.tasks[0].total) if self.by_time else info["step"]
            self.bar.update(self.task, completed=done)
        elif event == "log":
            self.bar.update(self.task, info=f"step {info['step']} loss {info['loss']:.4f} {info['images_per_s']:.0f} img/s")
        elif event == "notice" and info["message"] not in self.notices:
            self.notices.add(info["message"])
            self.bar.console.print(f"[yellow]note:[/] {escape(info['message'])}", highlight=False)
        elif event == "grid":
            self.bar.console.print(f"step {info['step']}: checkpoint and sample grid [cyan]{info['path']}[/]", highlight=False)


def with_progress(label: str, loop) -> None:
    """Run `loop(report, should_stop)` (training or distillation) under a progress bar,
    where the first Ctrl-C asks it to stop, save and sample, and the second quits at once."""
    stops = {"count": 0}

    def on_sigint(signum, frame):
        stops["count"] += 1
        if stops["count"] > 1:
            raise KeyboardInterrupt
        err_console.print("[yellow]stopping after this step and saving (Ctrl-C again to quit at once)...[/]")

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        with progress(label) as bar:
            result = loop(_Progress(bar), lambda: stops["count"] > 0)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    if result.step == 0:  # stopped before a new run's first step (a checkpoint holds one at least): nothing to resume
        err_console.print("interrupted before the first step; nothing was saved (start again without --resume).")
        raise typer.Exit(EXIT_INTERRUPTED)
    epochs = f" ({result.epoch:.2f} epochs)" if result.epoch else ""
    console.print(f"[bold green]done[/]: {result.step} steps{epochs}, stopped by {result.stopped_by}.")
    console.print(f"model: [cyan]{result.model_path}[/]")
    if result.grid_path:
        console.print(f"samples: [cyan]{result.grid_path}[/]")
    if result.stopped_by == "interrupt":
        console.print(f"next: diffcli {label} --out {quote(str(result.model_path.parent))} --resume goes on from step {result.step} "
                      f"(add --max-steps or --minutes for a new limit)", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    console.print(f"next: diffcli sample --ckpt {quote(str(result.model_path))} --label all --out samples.png", highlight=False)
