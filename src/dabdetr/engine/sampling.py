"""torch's DistributedSampler, made resumable in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """DistributedSampler (one seeded permutation per epoch, sharded rank::world_size, padded
    by wrapping around so every process takes the same number of steps) that can also skip the
    first indices of this process's shard, to resume mid-epoch.

    With world_size=1 the shard is the whole permutation, so one process with batch B*N sees
    exactly what N processes with batch B see together. Works without an initialized process
    group (rank and world size are given explicitly).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip
