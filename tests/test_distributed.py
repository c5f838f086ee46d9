"""Two CPU processes (gloo) give the CGC loss and gradients of one process on the full batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import OFFLINE_ENV, launch_env, layernorm_vit, step_inputs

from cgc_hf import CGCLoss, CropFlip
from cgc_hf.distributed import all_gather_rows

WORLD = 2
BATCH = 8  # full batch; each process holds BATCH // WORLD rows
UNEVEN = (3, 5)  # rows per process for the padding case


def _heatmaps(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, 7, 7, generator=g), torch.rand(n, 7, 7, generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    result = {}
    # (a) the loss alone: local rows against gathered negatives.
    aug, pos = _heatmaps(BATCH)
    b = BATCH // WORLD
    local_aug = aug[rank * b : (rank + 1) * b].clone().requires_grad_(True)  # (b, 7, 7)
    local_pos = pos[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = CGCLoss(0.5, gather=all_gather_rows)(local_aug, local_pos)
    loss.backward()
    result["loss"], result["grad_aug"], result["grad_pos"] = (
        loss.detach(),
        local_aug.grad,
        local_pos.grad,
    )
    # (b) uneven shares are padded for the collective and unpadded again.
    start = sum(UNEVEN[:rank])
    rows = slice(start, start + UNEVEN[rank])
    result["uneven_loss"] = CGCLoss(0.5, gather=all_gather_rows)(aug[rows], pos[rows]).detach()
    # (c) a whole model under DDP, fixed geometry: loss and averaged parameter gradients,
    # also with gradient checkpointing (blocks recomputed inside DDP's backward).
    for suffix in ("", "_checkpointed"):
        model = layernorm_vit()
        if suffix:
            model.gradient_checkpointing_enable()
        model.loss_fn.gather = all_gather_rows
        model.train()
        ddp = DistributedDataParallel(model)
        x, y, geometry = step_inputs(BATCH)
        sl = slice(rank * b, (rank + 1) * b)
        local_geometry = CropFlip(geometry.boxes[sl], geometry.flip[sl])
        out_model = ddp(x[sl], labels=y[sl], geometry=local_geometry)
        out_model["loss"].backward()
        result["model_loss" + suffix] = out_model["loss"].detach()
        result["model_cgc" + suffix] = out_model["loss_cgc"].detach()
        result["param_grads" + suffix] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    dist.destroy_process_group()
    # (d) the trainer under Accelerate: gather installed, evaluation counts each image once.
    result["trainer"] = _trainer_run(rank, port + 1, out)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _trainer_run(rank: int, port: int, out: str) -> dict:
    from cgc_hf import CGCTrainer, CGCTrainingArguments

    launch_env(rank, WORLD, port)
    g = torch.Generator().manual_seed(1)
    data = [
        {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)}
        for i in range(11)
    ]
    model = layernorm_vit()
    args = CGCTrainingArguments(
        output_dir=str(Path(out) / "run"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_train_steps=2,
        figure_images=0,
    )
    trainer = CGCTrainer(model, args, data[:8], eval_dataset=data[8:], unlabeled_dataset=data)
    metrics = trainer.train()
    return {
        "num_processes": trainer.accelerator.num_processes,
        "gather_installed": model.loss_fn.gather is all_gather_rows,
        "eval_samples": metrics["eval_samples"],
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_gather_loss_and_heatmap_gradients_match_full_batch(ranks):
    aug, pos = _heatmaps(BATCH)
    aug.requires_grad_(True)
    pos.requires_grad_(True)
    full = CGCLoss(0.5)(aug, pos)
    full.backward()
    # Each process's loss is the mean over its rows: their mean is the full-batch mean.
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean, full.detach())
    # The gather's backward sums every process's gradient for the local rows, i.e. the
    # gradient of the summed per-process losses = WORLD x the full-batch loss; DDP's averaging
    # divides by WORLD again.
    grad_aug = torch.cat([r["grad_aug"] for r in ranks]) / WORLD
    grad_pos = torch.cat([r["grad_pos"] for r in ranks]) / WORLD
    torch.testing.assert_close(grad_aug, aug.grad)
    torch.testing.assert_close(grad_pos, pos.grad)
    assert aug.grad.abs().sum() > 0  # the comparison is not between zeros


@pytest.mark.slow
def test_uneven_shares_give_the_full_batch_rows(ranks):
    aug, pos = _heatmaps(BATCH)
    full = CGCLoss(0.5)(aug, pos)
    weighted = sum(n * r["uneven_loss"] for n, r in zip(UNEVEN, ranks)) / BATCH
    torch.testing.assert_close(weighted, full)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", "_checkpointed"])
def test_ddp_model_gradients_equal_single_process_full_batch(ranks, suffix):
    model = layernorm_vit()
    model.train()
    x, y, geometry = step_inputs(BATCH)
    out = model(x, labels=y, geometry=geometry)
    out["loss"].backward()
    torch.testing.assert_close(
        torch.stack([r["model_cgc" + suffix] for r in ranks]).mean(), out["loss_cgc"].detach()
    )
    torch.testing.assert_close(
        torch.stack([r["model_loss" + suffix] for r in ranks]).mean(), out["loss"].detach()
    )
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ranks[0]["param_grads" + suffix].keys()
    for name, g in grads.items():
        for r in ranks:  # DDP leaves the same averaged gradient in every process
            got = r["param_grads" + suffix][name]
            torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-4)
            if suffix:  # recomputing the blocks changes no arithmetic
                assert torch.equal(got, r["param_grads"][name]), name
    assert out["loss_cgc"] > 0


@pytest.mark.slow
def test_trainer_installs_gather_and_counts_each_eval_image_once(ranks):
    runs = [r["trainer"] for r in ranks]
    assert all(t["num_processes"] == WORLD and t["gather_installed"] for t in runs)
    assert all(t["eval_samples"] == 3 for t in runs)  # 3 images, padded to 4 by the sampler
    torch.testing.assert_close(runs[0]["weights"], runs[1]["weights"], rtol=0, atol=0)


def test_without_a_process_group_the_gather_is_the_identity():
    z = torch.randn(3, 4)
    rows, offset = all_gather_rows(z)
    assert rows is z and offset == 0


_TEARDOWN = """
import os, tempfile
import torch
import torch.distributed as dist
import cgc_hf  # as the recipes import it: before the process group exists

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
import timm  # imported after the group exists, as loading a model does

x = torch.zeros(2)
dist.all_gather([torch.empty(2)], x)
dist.barrier()
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(",".join(names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_destroying_the_process_group_stops_its_threads():
    """No gloo thread may outlive destroy_process_group: one that frees a collective's tensors
    while Python exits aborts the process (cgc_hf/distributed.py imports the module that would
    otherwise keep the group alive)."""
    proc = subprocess.run(
        [sys.executable, "-c", _TEARDOWN], capture_output=True, text=True, env=OFFLINE_ENV
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = proc.stdout.strip().splitlines()[-1].split(",")
    assert not [t for t in threads if "gloo" in t], threads
