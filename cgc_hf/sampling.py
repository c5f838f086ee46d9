"""Data order and augmentation as pure functions of (seed, epoch, index), for exact resume.

A resumed run must see the same images in the same order with the same random augmentation
as an uninterrupted one, whatever the number of workers or where the run was stopped. The
sampler draws each epoch's order from ``(seed, epoch)``; the dataset wrapper draws each item's
augmentation from ``(seed, stream, epoch, index)`` under its own RNG state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """Indices in an order that is a pure function of ``(seed, epoch)``, tagged with the epoch.

    Yields ``(epoch, index)`` pairs, which :class:`SeededItems` turns into items whose random
    augmentation is a pure function of ``(seed, stream, epoch, index)``. With ``num_replicas``
    it yields this process's share (as ``DistributedSampler`` does); ``start`` skips items of
    the next pass only, which is how an unlabeled stream resumes mid-pass.
    """

    def __init__(
        self, size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.num_replicas > 1:
            order += order[: len(self) * self.num_replicas - self.size]  # equal share each
            order = order[self.rank :: self.num_replicas]
        start, self.start = self.start, 0
        return iter([(self.epoch, i) for i in order[start:]])


class SeededItems(Dataset):
    """Wrap a map-style dataset so item ``(epoch, i)`` is drawn under its own RNG seed.

    The torch, Python and NumPy generators are seeded from ``(seed, stream, epoch, i)`` around
    the wrapped ``__getitem__`` and restored afterwards, so augmentations do not depend on when
    or in which worker an item is loaded, and loading never disturbs the caller's RNG.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int) -> None:
        self.dataset, self.seed, self.stream = dataset, seed, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_rng(self.seed, self.stream, epoch, index):
            return self.dataset[index]


@contextmanager
def seeded_rng(*values: int) -> Iterator[None]:
    """Run the block under the torch (CPU), Python and NumPy generators seeded from ``values``.

    The caller's generator states are restored afterwards, so the block neither depends on nor
    disturbs the random numbers drawn around it.
    """
    s = _mix(*values)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) % (2**63 - 1)
    return h
