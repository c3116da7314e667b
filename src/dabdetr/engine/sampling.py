"""A seeded, resumable, shardable sampler (one permutation per epoch, as DistributedSampler)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation drawn from (seed, epoch), sharded rank::world_size.

    The shard of every process is padded by wrapping around so all take the same number of
    steps. `skip` drops the first indices of this process's shard (resuming mid-epoch). With
    world_size=1 this is the whole permutation, so one process with batch B*N sees exactly
    what N processes with batch B see together.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        per_rank = -(-self.size // self.world_size)
        total = per_rank * self.world_size
        order = (order * (total // self.size + 1))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.skip :])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.skip
