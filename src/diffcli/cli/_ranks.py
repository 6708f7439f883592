"""One process, or one rank of `torchrun --nproc_per_node N -m diffcli ...`: how train,
sample and eval join the process group, and what they say about it."""

from __future__ import annotations

import contextlib
import os

from diffcli.cli._common import console, err_console


@contextlib.contextmanager
def processes(device_name: str):
    """(world, device) for this process: one process, or one rank of `torchrun
    --nproc_per_node N -m diffcli ...`. Only rank 0 speaks (and the commands let only it
    write); the process group is left on the way out, whatever happens inside."""
    from diffcli import distributed
    from diffcli.devices import describe

    world, device = distributed.setup(device_name)
    if world.active:
        err_console.print(f"rank {world.rank} of {world.size}: {describe(device)}, pid {os.getpid()}", highlight=False)
    if not world.is_main:
        console.quiet = err_console.quiet = True
    try:
        yield world, device
    finally:
        distributed.shutdown(world)


def where(device, world) -> str:
    """The device a command ran on, and over how many processes."""
    from diffcli.devices import describe

    return describe(device) + (f" x {world.size} processes" if world.active else "")
