"""The data loaders of a run, ordered and augmented as pure functions of the seed.

The labeled loader is prepared by Accelerate (it shards it and decides from it when accumulated
gradients sync). The unlabeled pool is sharded by our own sampler and cycled independently of the
labeled epochs, and its position is part of the resume state, so a resumed run continues the pool
exactly where it stopped.
"""

from __future__ import annotations

import math
import os
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


MAX_DEFAULT_WORKERS = 8
"""Most worker processes per loader the default picks (timm's ``train.py`` uses 4 by default)."""


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_num_workers(device: torch.device | str, local_processes: int | None = None) -> int:
    """Workers per loader for ``dataloader_num_workers=None``.

    On an accelerator the training process mostly waits for the device, so decoding moves to
    ``min(8, cores per process - 1)`` workers (one core stays with the training process). On
    the CPU the model's own threads already use every core, and a worker only takes cores
    from them (the default job on 2 cores is slower with workers, see the README's
    Benchmarks > Loader), so images are decoded in the training process.

    Args:
        device: where the model trains (``accelerator.device``).
        local_processes: training processes on this machine (default: ``LOCAL_WORLD_SIZE``,
            which ``torchrun`` / ``accelerate launch`` set, else 1).
    """
    if torch.device(device).type == "cpu":
        return 0
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_process = usable_cpus() // max(1, local_processes)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def loader_options(
    args: Any, device: torch.device | str = "cpu", local_processes: int | None = None
) -> dict[str, Any]:
    """The ``DataLoader`` keywords for worker processes, pinned memory and prefetching.

    Args:
        args: ``dataloader_num_workers`` (``None``: :func:`default_num_workers`), and optionally
            ``dataloader_pin_memory`` and ``dataloader_prefetch_factor``.
        device: where the model trains; memory is pinned only for a CUDA device.
        local_processes: training processes on this machine (see :func:`default_num_workers`).
    """
    workers = args.dataloader_num_workers
    if workers is None:
        workers = default_num_workers(device, local_processes)
    options: dict[str, Any] = {
        "num_workers": workers,
        # Workers live for the whole run (the unlabeled pool is cycled many times, evaluation
        # recurs); items are seeded by (epoch, index), not by worker, so this changes no result.
        "persistent_workers": workers > 0,
        # Page-locked batches copy to the GPU faster and asynchronously.
        "pin_memory": bool(getattr(args, "dataloader_pin_memory", True))
        and torch.device(device).type == "cuda",
    }
    prefetch = getattr(args, "dataloader_prefetch_factor", None)
    if workers > 0 and prefetch is not None:
        options["prefetch_factor"] = prefetch
    return options


def seeded_loader(
    dataset: Dataset,
    sampler: Sampler | None,
    batch_size: int,
    collate: Collate,
    seed: int,
    options: dict[str, Any],
    drop_last: bool = False,
) -> DataLoader:
    """A loader in the sampler's order, with ``options`` from :func:`loader_options`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=collate,
        # Own generator: creating an iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def steps_per_epoch(train_size: int, args: Any, num_processes: int) -> int:
    """Optimizer steps in one pass over the labeled data (the last batch may be short)."""
    batches = math.ceil(train_size / (args.per_device_train_batch_size * num_processes))
    return math.ceil(batches / args.gradient_accumulation_steps)


def train_loader(
    dataset: Dataset, collate: Collate, args: Any, options: dict[str, Any] | None = None
) -> tuple[DataLoader, EpochSampler]:
    """The labeled loader (not yet prepared) and its epoch sampler.

    ``options`` are :func:`loader_options`' (default: for a model on the CPU).
    """
    sampler = EpochSampler(len(dataset), args.seed)
    loader = seeded_loader(
        SeededItems(dataset, args.seed, 0),
        sampler,
        args.per_device_train_batch_size,
        collate,
        args.seed,
        loader_options(args) if options is None else options,
    )
    return loader, sampler


def eval_loader(
    dataset: Dataset, collate: Collate, args: Any, options: dict[str, Any] | None = None
) -> DataLoader:
    """The evaluation loader (not yet prepared): the dataset in order, whole batches last short."""
    options = loader_options(args) if options is None else options
    return seeded_loader(
        dataset, None, args.per_device_eval_batch_size, collate, args.seed, options
    )


class UnlabeledStream:
    """Endless batches of the unlabeled pool for this process, resumable from a state.

    Args:
        dataset: the pool; its labels, if any, are ignored.
        collate: batches a list of items.
        args: the run's training arguments (seed, ``unlabeled_batch_size``, workers).
        num_processes: processes the pool is sharded over.
        rank: this process.
        options: :func:`loader_options`' (default: for a model on the CPU).
    """

    def __init__(
        self,
        dataset: Dataset,
        collate: Collate,
        args: Any,
        num_processes: int,
        rank: int,
        options: dict[str, Any] | None = None,
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
            args.seed,
            loader_options(args) if options is None else options,
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


def prepare_model(model: Any, args: Any) -> None:
    """The model's memory options: 4-D weights in NHWC with ``args.channels_last``; the blocks
    before the target layer recomputed in the backward with ``args.gradient_checkpointing``."""
    model.to(memory_format=memory_format(args))
    if getattr(args, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable()


def memory_format(args: Any) -> torch.memory_format:
    """The memory format of the training model and images: NHWC with ``args.channels_last``,
    else whatever format they already have."""
    return torch.channels_last if getattr(args, "channels_last", False) else torch.preserve_format


def merge(
    batch: dict[str, Tensor],
    unlabeled: Iterator[dict[str, Tensor]] | None,
    image_format: torch.memory_format = torch.preserve_format,
) -> tuple[Tensor, Tensor]:
    """Labeled images and labels, with the next unlabeled batch appended (labels ``-100``),
    the images in ``image_format``.

    Shape:
        Returns ``(B + U, 3, H, W)`` images and ``(B + U,)`` labels (``U = 0`` without a pool).
    """
    pixel_values, labels = batch["pixel_values"], batch["labels"]  # (B, 3, H, W), (B,)
    if unlabeled is not None:
        u = next(unlabeled)["pixel_values"].to(pixel_values.device)  # (U, 3, H, W)
        no_label = torch.full(
            (u.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
        )  # (U,)
        pixel_values, labels = torch.cat([pixel_values, u]), torch.cat([labels, no_label])
    return pixel_values.to(memory_format=image_format), labels
