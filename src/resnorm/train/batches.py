"""Which samples a step takes: the epoch's global batches, a function of (seed, epoch) only,
each process's slice of one, and each process's random-number seed."""

from __future__ import annotations

import torch


def _batches(
    n: int, batch_size: int, seed: int, epoch: int, world_size: int = 1
) -> list[torch.Tensor]:
    """The epoch's shuffled global batches of ``world_size * batch_size`` samples, a function
    of (seed, epoch) only, so a resumed run sees the same order, and a run of N processes
    with batch B sees the batches of one process with batch N x B. A trailing smaller
    batch is kept only if it gives every process at least 2 samples (batch norm needs 2):
    in one process, a trailing batch of one sample is dropped."""
    size = batch_size * world_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [
        order[s : s + size]
        for s in range(0, n, size)
        if n - s >= size or n - s >= 2 * world_size or n == 1
    ]


def _shard(batch: torch.Tensor, world_size: int, rank: int) -> tuple[torch.Tensor, int]:
    """This process's contiguous slice of a global batch and where it starts: equal
    slices for a full batch, sizes differing by at most one for a trailing one."""
    pieces = batch.tensor_split(world_size)
    return pieces[rank], sum(len(p) for p in pieces[:rank])


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process is rank 0 of one); the others get their
    own random-number generator states (dropout masks), deterministic in (seed, rank)."""
    return seed if rank == 0 else seed * 1_000_003 + 7919 * rank
