"""``EpochBatchSampler``: an endless, resumable stream of training batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler):
    """Batches of (index, epoch) keys, from iteration ``start`` on, forever.

    Each epoch is a permutation of the dataset seeded by (seed, epoch), cut into
    global batches of ``batch_size · world_size`` samples (the remainder is
    dropped); rank r takes the r-th slice of each global batch. So the ranks of a
    data-parallel run together see the batches a single process with the global
    batch size would see, and iteration i's batch depends on i alone (resuming at
    i continues the stream exactly).
    """

    def __init__(self, length: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = length // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {length} samples, fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.start = rank, start

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration, epoch, order = self.start, -1, None
        while True:
            batch_epoch, position = divmod(iteration, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self.epoch_order(batch_epoch)
            first = position * self.global_batch + self.rank * self.batch_size
            yield [(int(index), epoch) for index in order[first:first + self.batch_size]]
            iteration += 1
