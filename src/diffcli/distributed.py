"""torch.distributed for `torchrun --nproc_per_node N -m diffcli train|sample|eval ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and spans nodes with --nnodes and
--rdzv-endpoint); without them everything here is a no-op and the run is one process.
Backend by device: NCCL on CUDA, gloo on the CPU, so the same command runs in tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from diffcli.errors import UserError

# A rank waits this long for the others (rank 0 draws sample grids while they wait at
# the next gradient all-reduce) before it gives up with an error instead of hanging.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun describes and pick this rank's device."""
    from diffcli.devices import pick_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), pick_device(device_name)
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT,
                                **({"device_id": torch.device("cuda", world.local_rank)} if use_cuda else {}))
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        return world, torch.device("cuda", world.local_rank)
    return world, torch.device("cpu")


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any: all ranks stop on the same step."""
    if not world.active:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    if world.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def mean_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    if world.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def check_batch(world: World, batch: int) -> int:
    """The per-rank share of the global batch."""
    if batch % world.size:
        raise UserError(f"the global batch size {batch} does not divide among {world.size} processes; "
                        f"pass a --batch-size that is a multiple of {world.size}.")
    return batch // world.size


def share(world: World, n: int) -> slice:
    """This rank's contiguous share of n items (the first n % size ranks take one more)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def gather_shares(world: World, mine: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `share` of n rows, concatenated in rank order, on every rank: the whole
    of what one process would have made. Padded to the largest share for the collective."""
    if not world.active:
        return mine
    shares = [share(World(r, world.size), n) for r in range(world.size)]
    longest = max(s.stop - s.start for s in shares)
    shapes: list = [None] * world.size  # a rank with no share (n < size) learns the row shape from the others
    dist.all_gather_object(shapes, tuple(mine.shape[1:]) if len(mine) else None)
    row = next(s for s in shapes if s is not None)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((longest, *row), dtype=mine.dtype, device=on)
    if len(mine):
        padded[:len(mine)] = mine.to(on)
    parts = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(parts, padded)
    return torch.cat([part[:s.stop - s.start] for part, s in zip(parts, shares)]).to(mine.device)


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
