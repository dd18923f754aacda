"""Processes and devices for training: torchrun's process group, CPU threads, device choice.

Under `torchrun` (env WORLD_SIZE > 1) `distributed_context` joins the process group from
torchrun's variables: gloo on CPU, NCCL on CUDA, one device per local rank.
"""

import contextlib
import logging
import os
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)


def select_device(device: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """`device` if given ("cpu", "cuda", "cuda:1"), else CUDA when present, else CPU.

    >>> select_device("cpu")
    device(type='cpu')
    """
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


@contextlib.contextmanager
def distributed_context(device: Optional[str]) -> Iterator[tuple[int, int, int]]:
    """(rank, world_size, local_rank): joins torchrun's process group (env WORLD_SIZE > 1) and
    leaves it on exit; an existing group is used as is."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size(), local_rank
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1, 0
    else:
        backend = "nccl" if select_device(device, local_rank).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
        try:
            yield dist.get_rank(), dist.get_world_size(), local_rank
        finally:
            dist.destroy_process_group()


def set_threads(n_threads: Optional[int], world_size: int) -> None:
    """torch CPU threads: `n_threads`, or the cores split between the local ranks under torchrun
    (1 each for 2 ranks on 2 cores), or PyTorch's default (all cores) for one process."""
    if n_threads is None and world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        n_threads = max(1, (os.cpu_count() or 1) // local)
    if n_threads is not None:
        torch.set_num_threads(n_threads)


def barrier(world_size: int) -> None:
    """Wait for every rank (a no-op for one process)."""
    if world_size > 1:
        torch.distributed.barrier()


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar tensor over the ranks, as a float (the value itself for one process)."""
    if world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value.item())
