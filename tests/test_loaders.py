"""Data loader defaults: worker processes from the CPU count, pinned memory, prefetch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from cgc_hf import (
    ArgumentGroup,
    CGCArgumentParser,
    CGCTrainingArguments,
    CGCValueError,
    loader_options,
)
from cgc_hf.training import CGCTrainer, loaders


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": torch.tensor(i % 3)}


def _args(tmp_path, **kw) -> CGCTrainingArguments:
    return CGCTrainingArguments(output_dir=str(tmp_path), figure_images=0, **kw)


@pytest.mark.parametrize(
    ("cpus", "processes", "expected"),
    [(16, 1, 8), (64, 1, 8), (4, 1, 3), (2, 1, 1), (1, 1, 0), (16, 4, 3), (16, 8, 1)],
)
def test_default_workers_on_an_accelerator_follow_the_cores_per_process(
    monkeypatch, cpus, processes, expected
):
    monkeypatch.setattr(loaders, "usable_cpus", lambda: cpus)
    assert loaders.default_num_workers("cuda", local_processes=processes) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))  # what torchrun / accelerate set
    assert loaders.default_num_workers(torch.device("cuda", 0)) == expected


def test_default_workers_on_the_cpu_are_none(monkeypatch):
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 64)
    assert loaders.default_num_workers("cpu") == 0


def test_usable_cpus_is_the_affinity_not_the_machine():
    if not hasattr(loaders.os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert loaders.usable_cpus() == len(loaders.os.sched_getaffinity(0))


def test_loader_options_default_explicit_pin_and_prefetch(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 16)
    default = _args(tmp_path)
    assert default.dataloader_num_workers is None
    assert loader_options(default, "cuda", 1) == {
        "num_workers": 8,
        "persistent_workers": True,
        "pin_memory": True,
    }
    assert loader_options(default, "cpu") == {
        "num_workers": 0,
        "persistent_workers": False,
        "pin_memory": False,  # nothing to copy to
    }
    explicit = _args(tmp_path, dataloader_num_workers=0)
    assert loader_options(explicit, "cuda", 1)["num_workers"] == 0  # 0 stays 0
    tuned = _args(
        tmp_path,
        dataloader_num_workers=3,
        dataloader_pin_memory=False,
        dataloader_prefetch_factor=4,
    )
    assert loader_options(tuned, "cuda", 1) == {
        "num_workers": 3,
        "persistent_workers": True,
        "pin_memory": False,
        "prefetch_factor": 4,
    }
    # On the CPU the default has no workers, so a prefetch factor has nothing to apply to.
    prefetch_only = _args(tmp_path, dataloader_prefetch_factor=4)
    assert "prefetch_factor" not in loader_options(prefetch_only, "cpu")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"dataloader_num_workers": -1}, ["dataloader_num_workers", "-1", ">= 0"]),
        ({"dataloader_prefetch_factor": 0}, ["dataloader_prefetch_factor", "0", "positive"]),
        (
            {"dataloader_num_workers": 0, "dataloader_prefetch_factor": 2},
            ["dataloader_prefetch_factor=2", "dataloader_num_workers=0", ">= 1"],
        ),
    ],
)
def test_bad_loader_options_name_the_argument(tmp_path, options, words):
    with pytest.raises(CGCValueError) as err:
        _args(tmp_path, **options)
    for word in words:
        assert word in str(err.value)


def test_loader_flags_parse_by_type(tmp_path):
    parser = CGCArgumentParser([ArgumentGroup("training", CGCTrainingArguments)], prog="x")
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--dataloader_num_workers",
            "none",
            "--no_dataloader_pin_memory",
        ]
    )
    assert args.dataloader_num_workers is None and args.dataloader_pin_memory is False
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--dataloader_num_workers", "2"]
    )
    assert args.dataloader_num_workers == 2


@pytest.mark.usefixtures("fresh_accelerate")
def test_trainer_builds_every_loader_with_the_resolved_options(tmp_path, monkeypatch):
    seen = []
    real = loaders.seeded_loader

    def spy(*args, **kwargs):
        loader = real(*args, **kwargs)
        seen.append((loader.num_workers, loader.persistent_workers, loader.pin_memory))
        return loader

    monkeypatch.setattr(loaders, "seeded_loader", spy)
    args = _args(tmp_path, per_device_train_batch_size=4, max_train_steps=1)
    CGCTrainer(tiny_model(), args, _Images(8), _Images(4), unlabeled_dataset=_Images(8))
    # The model trains on the CPU here: the default decodes in the training process.
    assert seen == [(0, False, False)] * 3
    seen.clear()
    args = _args(tmp_path / "w", per_device_train_batch_size=4, dataloader_num_workers=1)
    CGCTrainer(tiny_model(), args, _Images(8), _Images(4), unlabeled_dataset=_Images(8))
    assert seen == [(1, True, False)] * 3
