"""Determinism: the same CGC step gives bit-identical gradients, so runs repeat and resume exactly.

Run-to-run differences on CPU come from kernels that add in parallel with atomics (the backward of
``weight[classes]`` did, once ``B * C`` reaches 32768 elements and more than one thread runs), so
these tests use two threads and, for the closed-form heatmap, a head wide enough to cross that
size. Every heatmap path is covered: the closed form on a 1x1, a 2x2 and a larger grid, the
autograd heatmap of a pool-norm-linear head, an NHWC layer, a class-token ViT and a transformers
model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import Stop, reset_accelerate, resnet_run, tiny_hf, tiny_timm

from cgc_hf import CGCModel, CropFlip, sample_crop_flip

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
THREADS = 2  # atomics-based parallel kernels only race with more than one thread


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def lite0(size: int) -> tuple[CGCModel, int]:
    """EfficientNet-Lite0: closed-form head over 1280 channels, grid size / 32."""
    torch.manual_seed(0)
    return CGCModel.from_backbone("tf_efficientnet_lite0", num_labels=3, pretrained=False), size


# name -> (model factory, image side); the factories build random-init models offline
PATHS: dict[str, Callable[[], tuple[CGCModel, int]]] = {
    "closed_form_1x1": lambda: lite0(32),
    "closed_form_2x2": lambda: lite0(64),
    "closed_form_4x4": lambda: (tiny_timm("resnet"), 128),
    "pool_norm_linear": lambda: (tiny_timm("convnext"), 64),
    "nhwc_swin": lambda: (tiny_timm("swin"), 32),
    "class_token_vit": lambda: (tiny_timm("vit_token"), 32),
    "transformers_vit": lambda: (tiny_hf("vit"), 32),
    "transformers_convnext": lambda: (tiny_hf("convnext"), 64),
}


def cgc_step_gradients(model: CGCModel, x, labels, geometry: CropFlip) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same random state (dropout, stochastic depth) for every repeat
    out = model(x, labels=labels, geometry=geometry)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["loss_cgc"] = out["loss_cgc"].detach().clone()
    return grads


@pytest.mark.parametrize("path", list(PATHS))
def test_repeated_cgc_step_gives_bit_identical_gradients(path, two_threads):
    model, size = PATHS[path]()
    model.train()
    if path.startswith("closed_form"):
        assert model.target.linear_head is not None, model.target
    g = torch.Generator().manual_seed(1)
    b = 16  # 2B = 32 rows: with 1280 channels the head's gradient crosses 32768 elements
    x = torch.randn(b, 3, size, size, generator=g)
    labels = torch.arange(b) % model.num_labels
    labels[b // 2 :] = -100  # half unlabeled, as the trainer's batches are
    geometry = sample_crop_flip(b, generator=g)
    first = cgc_step_gradients(model, x, labels, geometry)
    assert first["loss_cgc"] > 0
    assert any(bool(v.any()) for k, v in first.items() if k != "loss_cgc")
    for _ in range(3):
        again = cgc_step_gradients(model, x, labels, geometry)
        assert again.keys() == first.keys()
        differ = [k for k in first if not torch.equal(first[k], again[k])]
        assert not differ, f"{len(differ)} of {len(first)} gradients differ: {differ[:5]}"


# Backward kernels that add with atomics on CUDA (PyTorch's reproducibility notes): the CGC term
# must not reach them, so its gradient is deterministic on a GPU too.
ATOMIC_ON_CUDA = ("GridSampler2DBackward", "UpsampleBilinear2DBackward", "IndexBackward")


def backward_ops(t: torch.Tensor, stop: set) -> set[str]:
    """Names of the autograd nodes behind ``t``, not descending below the nodes in ``stop``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("path", list(PATHS))
def test_cgc_term_uses_no_backward_that_adds_with_atomics_on_cuda(path):
    model, size = PATHS[path]()
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=g)
    seen = {}
    original = model._heatmaps

    def heatmaps(activations, *args, **kwargs):
        seen["activations"] = activations
        return original(activations, *args, **kwargs)

    model._heatmaps = heatmaps
    out = model(x, labels=torch.tensor([0, 1, 2, 0]), geometry=sample_crop_flip(4, generator=g))
    # Stop at the backbone's output: what lies below is the backbone's own backward.
    stop = {seen["activations"].grad_fn}
    ops = backward_ops(out["loss_cgc"], stop)
    assert not [op for op in ops if op.startswith(ATOMIC_ON_CUDA)], sorted(ops)


# ------------------------------------------------------------------ kill -9, resume, same run
# EfficientNet-Lite0 at 64 px (a 2x2 grid) with two threads: the closed-form head over 1280
# channels, batches of 8 labeled + 8 unlabeled images; 24 labeled images: 3 steps per epoch.
LITE0_RUN = [
    "--model", "tf_efficientnet_lite0",
    "--no_pretrained",
    "--image_size", "64",
    "--synthetic_kwargs",
    '{"num_classes": 3, "train_size": 48, "eval_size": 12, "image_size": 64}',
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "12",
    "--labels_per_class", "8",
    "--figure_images", "0",
    "--max_train_steps", "6",
    "--checkpointing_steps", "3",
    "--eval_steps", "6",
]  # fmt: skip
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    OMP_NUM_THREADS=str(THREADS),
)
# Runs the recipe and stops for good after optimizer step AT (writing MARKER) so the test can
# kill it there with SIGKILL.
DRIVER = """
import os, runpy, sys, time
from pathlib import Path

at, marker, recipe = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.argv = [recipe, *sys.argv[4:]]
from cgc_hf import CGCTrainer

original = CGCTrainer._step_end


def step_end(self):
    original(self)
    if self.state.global_step == at:
        marker.write_text(str(os.getpid()))
        time.sleep(600)


CGCTrainer._step_end = step_end
runpy.run_path(recipe, run_name="__main__")
"""


def run_recipe(*argv: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(RECIPE), *argv],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = weights(out), weights(ref)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ: {differ[:5]}"
    got_m, want_m = (json.loads((p / "metrics.json").read_text()) for p in (out, ref))
    assert got_m["evaluations"] == want_m["evaluations"]
    drop = ("train_runtime",)
    assert {k: v for k, v in got_m["final"].items() if k not in drop} == {
        k: v for k, v in want_m["final"].items() if k not in drop
    }


@pytest.mark.slow
def test_efficientnet_cgc_run_repeats_and_resumes_after_kill_9_exactly(tmp_path):
    reference = tmp_path / "reference"
    run_recipe(*LITE0_RUN, "--output_dir", str(reference))
    out, marker = tmp_path / "run", tmp_path / "marker"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(driver), "4", str(marker), str(RECIPE), *LITE0_RUN]
            + ["--output_dir", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (out / "checkpoints" / "step_3").is_dir()
    run_recipe(*LITE0_RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert_same_run(out, reference)


# ------------------------------------------------------------------ data loader workers
def _train(out: Path, workers: int, stop_at: int | None = None, resume: str | None = None):
    return resnet_run(out, stop_at, resume, dataloader_num_workers=workers)


@pytest.mark.usefixtures("fresh_accelerate")
def test_loader_workers_resume_to_the_single_process_run(tmp_path):
    reference = _train(tmp_path / "ref", workers=0).state_dict()
    reset_accelerate()
    with pytest.raises(Stop):
        _train(tmp_path / "run", workers=2, stop_at=3)
    reset_accelerate()
    resumed = _train(tmp_path / "run", workers=2, resume="latest").state_dict()
    assert resumed.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differ, differ[:5]
