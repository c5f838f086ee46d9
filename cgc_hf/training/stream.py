"""A streamed unlabeled pool: a ``datasets.IterableDataset`` or any torch ``IterableDataset``.

Unlabeled pools are the large ones; streamed, they are neither downloaded nor held whole. A
resumed run still equals an uninterrupted one, with these meanings:

- one pass over the stream is one unlabeled epoch. Before each, ``set_epoch(epoch)`` is called
  where the dataset has it (a ``datasets`` stream shuffled with ``shuffle(seed, buffer_size)``
  then shuffles with ``seed + epoch``); the stream's order must be a function of the epoch;
- each example is read under the torch, Python and NumPy generators seeded from
  ``(seed, epoch, position)``, so random transforms inside the stream (``.map``) repeat;
- resume reads again, and drops, the examples the stopped run had used in its current epoch
  (``unlabeled_batches * unlabeled_batch_size`` per process): exact, at the cost of reading
  them, since a stream cannot seek;
- with several processes, a ``datasets`` stream is split by
  ``datasets.distributed.split_dataset_by_node``, any other stream by position (process ``r``
  of ``n`` keeps examples ``r, r + n, ...``);
- each pass's last incomplete batch is dropped, as for a map-style pool;
- the stream is read in the training process: loader workers would each iterate a copy of it,
  and which worker made which batch would change the batches.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor
from torch.utils.data import IterableDataset

from ..errors import CGCValueError
from ..sampling import seeded_rng
from .checkpoints import TrainerState

UNLABELED_STREAM = 1
"""The RNG stream of unlabeled items (``SeededItems(dataset, seed, 1)`` for a map-style pool)."""
_END = object()


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is read by iterating (no ``len``, no indexing)."""
    return isinstance(dataset, IterableDataset)


class StreamedUnlabeled:
    """Endless batches of a streamed unlabeled pool for this process, resumable from a state.

    Args:
        dataset: the stream; items as ``collate`` takes them (labels, if any, are ignored).
        collate: batches a list of items.
        args: the run's training arguments (``seed``, ``unlabeled_batch_size``).
        num_processes: processes the stream is split over.
        rank: this process.

    Example:
        >>> pool = StreamedUnlabeled(stream, collate, args, num_processes=1, rank=0)
        >>> batch = next(pool.batches(trainer_state))  # {"pixel_values": (8, 3, H, W), ...}
    """

    def __init__(
        self,
        dataset: IterableDataset,
        collate: Callable[[list[Any]], dict[str, Tensor]],
        args: Any,
        num_processes: int,
        rank: int,
    ) -> None:
        self.collate, self.batch_size, self.seed = collate, args.unlabeled_batch_size, args.seed
        self.stride, self.offset = num_processes, rank
        if num_processes > 1 and hasattr(dataset, "n_shards"):  # a datasets.IterableDataset
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=num_processes)
            self.stride, self.offset = 1, 0
        self.dataset = dataset

    def examples(self, epoch: int) -> Iterator[Any]:
        """This process's examples of one pass, each read under its own seeded RNG."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        stream = iter(self.dataset)
        for position in itertools.count():
            with seeded_rng(self.seed, UNLABELED_STREAM, epoch, position):
                item = next(stream, _END)
            if item is _END:
                return
            if position % self.stride == self.offset:
                yield item

    def batches(self, state: TrainerState) -> Iterator[dict[str, Tensor]]:
        """Batches from the position recorded in ``state`` on, forever (``state`` follows)."""
        while True:
            examples = self.examples(state.unlabeled_epoch)
            used = state.unlabeled_batches * self.batch_size
            collections.deque(itertools.islice(examples, used), maxlen=0)  # read and drop
            while len(rows := list(itertools.islice(examples, self.batch_size))) == self.batch_size:
                state.unlabeled_batches += 1
                yield self.collate(rows)
            if state.unlabeled_batches == 0:
                raise CGCValueError(
                    f"unlabeled_batch_size={self.batch_size} is larger than the {len(rows)} "
                    "examples one pass over the streamed unlabeled_dataset gave this process; "
                    "lower it, or stream more images."
                )
            state.unlabeled_epoch += 1
            state.unlabeled_batches = 0
