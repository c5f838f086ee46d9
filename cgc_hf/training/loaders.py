"""The data loaders of a run, ordered and augmented as pure functions of the seed.

The labeled loader is prepared by Accelerate (it shards it and decides from it when accumulated
gradients sync). The unlabeled pool is sharded by our own sampler and cycled independently of the
labeled epochs, and its position is part of the resume state, so a resumed run continues the pool
exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import IGNORE_INDEX
from ..errors import CGCValueError
from ..sampling import EpochSampler, SeededItems
from .checkpoints import TrainerState

Collate = Callable[[list[Any]], dict[str, Tensor]]


def seeded_loader(
    dataset: Dataset,
    sampler: Sampler | None,
    batch_size: int,
    collate: Collate,
    args: Any,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        # Workers live for the whole run (the unlabeled pool is cycled many times); items are
        # seeded by (epoch, index), not by worker, so this changes no result.
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=torch.cuda.is_available(),  # faster, asynchronous copies to the GPU
        # Own generator: creating an iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )


def steps_per_epoch(train_size: int, args: Any, num_processes: int) -> int:
    """Optimizer steps in one pass over the labeled data (the last batch may be short)."""
    batches = math.ceil(train_size / (args.per_device_train_batch_size * num_processes))
    return math.ceil(batches / args.gradient_accumulation_steps)


def train_loader(dataset: Dataset, collate: Collate, args: Any) -> tuple[DataLoader, EpochSampler]:
    """The labeled loader (not yet prepared) and its epoch sampler."""
    sampler = EpochSampler(len(dataset), args.seed)
    loader = seeded_loader(
        SeededItems(dataset, args.seed, 0), sampler, args.per_device_train_batch_size, collate, args
    )
    return loader, sampler


class UnlabeledStream:
    """Endless batches of the unlabeled pool for this process, resumable from a state.

    Args:
        dataset: the pool; its labels, if any, are ignored.
        collate: batches a list of items.
        args: the run's training arguments (seed, ``unlabeled_batch_size``, workers).
        num_processes: processes the pool is sharded over.
        rank: this process.
    """

    def __init__(
        self, dataset: Dataset, collate: Collate, args: Any, num_processes: int, rank: int
    ) -> None:
        self.batch_size = args.unlabeled_batch_size
        self.sampler = EpochSampler(
            len(dataset), args.seed + 1, num_replicas=num_processes, rank=rank
        )
        self.loader = seeded_loader(
            SeededItems(dataset, args.seed, 1),
            self.sampler,
            self.batch_size,
            collate,
            args,
            drop_last=True,
        )
        if len(self.loader) == 0:
            raise CGCValueError(
                f"unlabeled_batch_size={self.batch_size} is larger than the "
                f"{len(self.sampler)} unlabeled images of each process; lower it."
            )

    def batches(self, state: TrainerState) -> Iterator[dict[str, Tensor]]:
        """Cycle the pool forever from the position recorded in ``state`` (updated as it goes)."""
        while True:
            self.sampler.set_epoch(state.unlabeled_epoch)
            self.sampler.start = state.unlabeled_batches * self.batch_size
            for batch in self.loader:
                state.unlabeled_batches += 1
                yield batch
            state.unlabeled_epoch += 1
            state.unlabeled_batches = 0


def merge(
    batch: dict[str, Tensor], unlabeled: Iterator[dict[str, Tensor]] | None
) -> tuple[Tensor, Tensor]:
    """Labeled images and labels, with the next unlabeled batch appended (labels ``-100``)."""
    pixel_values, labels = batch["pixel_values"], batch["labels"]  # (B, 3, H, W), (B,)
    if unlabeled is None:
        return pixel_values, labels
    u = next(unlabeled)["pixel_values"].to(pixel_values.device)  # (U, 3, H, W)
    no_label = torch.full(
        (u.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
    )  # (U,)
    return torch.cat([pixel_values, u]), torch.cat([labels, no_label])  # (B + U, ...)
