"""A streamed unlabeled pool (``datasets.IterableDataset`` or a torch ``IterableDataset``): a run
stopped mid-pass and resumed ends with the weights of the uninterrupted run, random transforms
inside the stream included; several processes split it; a stream shorter than a batch is
refused."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from conftest import NoiseImages, Stop, reset_accelerate, stop_after, tiny_args, tiny_model
from torch.utils.data import IterableDataset

from cgc_hf import CGCTrainer, CGCValueError
from cgc_hf.training import TrainerState
from cgc_hf.training.stream import StreamedUnlabeled

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def hf_stream(n: int) -> datasets.IterableDataset:
    """``n`` noise images, shuffled per epoch, with random noise added inside the stream."""
    images = NoiseImages(n, 2)
    table = datasets.Dataset.from_dict({"pixel_values": images.x.numpy(), "index": list(range(n))})

    def jitter(row):  # a random transform, like an augmentation mapped over a stream
        pixels = np.asarray(row["pixel_values"], dtype=np.float32)
        row["pixel_values"] = pixels + 0.5 * torch.randn(pixels.shape).numpy()
        return row

    stream = table.to_iterable_dataset(num_shards=2).shuffle(seed=0, buffer_size=4)
    return stream.map(jitter).with_format("torch")


class Counting(IterableDataset):
    """Items ``{"pixel_values", "index"}`` 0..n-1 in order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield {"pixel_values": torch.full((3, 2, 2), float(i)), "index": torch.tensor(i)}


def run(out, stop_at=None, **options) -> CGCTrainer:
    args = tiny_args(
        out, max_train_steps=6, checkpointing_steps=2, unlabeled_batch_size=4, **options
    )
    # 14 streamed images: 3 batches of 4 per pass (2 dropped), so 6 steps take 2 passes and
    # the checkpoints of steps 2 and 4 fall inside a pass.
    trainer = CGCTrainer(tiny_model(), args, NoiseImages(8), unlabeled_dataset=hf_stream(14))
    stop_after(trainer, stop_at)
    return trainer


def weights(trainer: CGCTrainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stopped_mid_pass_and_resumed_equals_the_uninterrupted_run(tmp_path, fresh_accelerate):
    reference = run(tmp_path / "ref")
    reference.train()
    want = weights(reference)
    assert (reference.state.unlabeled_epoch, reference.state.unlabeled_batches) == (1, 3)
    for stop_at in (5, 3):  # resume from step 4 (pass 1, batch 1) and step 2 (pass 0, batch 2)
        reset_accelerate()
        out = tmp_path / f"stopped-{stop_at}"
        with pytest.raises(Stop):
            run(out, stop_at=stop_at).train()
        reset_accelerate()
        resumed = run(out, resume_from_checkpoint="latest")
        resumed.train()
        got = weights(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want), stop_at
    assert resumed._resolved()["images"]["unlabeled"] is None  # a stream is not counted


def first_pass(pool: StreamedUnlabeled) -> list[int]:
    state, indices = TrainerState(), []
    for batch in pool.batches(state):
        if state.unlabeled_epoch > 0:  # the first batch of the next pass
            break
        indices += batch["index"].tolist()
    return indices


def test_processes_split_a_stream_and_each_pass_drops_its_short_batch(tmp_path):
    args = tiny_args(tmp_path, unlabeled_batch_size=2)
    collate = torch.utils.data.default_collate
    ranks = [first_pass(StreamedUnlabeled(Counting(13), collate, args, 2, r)) for r in (0, 1)]
    assert ranks == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]  # by position; 12 was short
    hf = [first_pass(StreamedUnlabeled(hf_stream(12), collate, args, 2, r)) for r in (0, 1)]
    assert not set(hf[0]) & set(hf[1]) and sorted(hf[0] + hf[1]) == list(range(12))


def test_a_stream_shorter_than_a_batch_is_refused(tmp_path):
    pool = StreamedUnlabeled(
        Counting(3),
        torch.utils.data.default_collate,
        tiny_args(tmp_path, unlabeled_batch_size=4),
        1,
        0,
    )
    with pytest.raises(CGCValueError, match=r"unlabeled_batch_size=4 is larger than the 3 "):
        next(pool.batches(TrainerState()))
