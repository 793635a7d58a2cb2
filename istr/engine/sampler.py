"""Resumable training data order: a DistributedSampler-backed batch sampler and per-sample augmentation seeds.

The data order is a pure function of (seed, epoch) and the augmentation randomness of each sample a pure
function of (seed, epoch, index), so a run resumed mid-epoch, with or without DataLoader workers, sees exactly
the batches and augmentations that an uninterrupted run would have seen.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["ResumableBatchSampler", "SeededDataset", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentations of sample `index` in `epoch` (independent of rank and world size)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class ResumableBatchSampler(Sampler[list]):
    """Batches of (index, sample_seed) pairs for one epoch of this rank's share of the data.

    Wraps torch's DistributedSampler (shuffle seeded by seed + epoch, padded to a multiple of world_size,
    rank r takes every world_size-th index), so one process with batch B*W and W processes with batch B see
    the same global batches. `set_epoch(epoch, skip_batches)` chooses the epoch and how many of its leading
    batches to skip (used when resuming mid-epoch).
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if dataset_len < 1:
            raise ValueError(f"the training dataset is empty (len {dataset_len})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, int(seed), drop_last
        # DistributedSampler only needs len(); it works without a process group when rank/world_size are given.
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=self.seed, drop_last=False)
        if len(self) == 0:
            raise ValueError(f"batch_size {batch_size} x world_size {world_size} is larger than the dataset "
                             f"({dataset_len} images) and drop_last=True leaves no batch; use a smaller batch")
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)
        self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.sampler)
        for b in range(self.skip_batches, len(self)):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


class SeededDataset(Dataset):
    """Index with (index, seed) -> (index, dataset[index]), the item computed with torch, numpy and python
    `random` seeded by `seed`.

    The caller's RNG states are restored afterwards, so loading data in the main process (num_workers=0) does
    not disturb the model's own randomness.
    """

    def __init__(self, dataset: Sequence[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2 ** 32))
            try:
                return index, self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
