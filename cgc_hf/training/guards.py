"""Guards of a training step: a non-finite loss skips the update, running out of memory is advice.

A batch whose loss is NaN or inf (a corrupt image, an overflow) must not reach the weights: its
backward still runs, so every process takes part in DDP's gradient reduction, but the optimizer
step is skipped, the gradients are dropped, and the BatchNorm running statistics that the batch
moved are put back. Every process decides alike (the verdict is summed over processes).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CGCError, CGCMemoryError, CGCValueError, CheckpointError

logger = logging.getLogger(__name__)


class NonFiniteWindow:
    """The batches accumulated towards one optimizer step: are they all finite?

    Example:
        >>> window = NonFiniteWindow(model)       # before the first batch of a step
        >>> window.add(all_finite(loss, acc))     # after each batch's forward
        >>> if not window.finite: window.restore()  # instead of the optimizer step
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.size = 0
        self.finite = True
        self._buffers = [b.detach().clone() for b in model.buffers() if b.is_floating_point()]

    def add(self, finite: bool) -> None:
        self.size += 1
        self.finite &= finite

    def restore(self) -> None:
        """Undo what the window's batches did to running statistics (BatchNorm sees NaN too)."""
        with torch.no_grad():
            floating = [b for b in self.model.buffers() if b.is_floating_point()]
            for buffer, saved in zip(floating, self._buffers):
                buffer.copy_(saved)


def all_finite(loss: Tensor, accelerator: Any) -> bool:
    """Whether ``loss`` is finite in every process (each process gets the same answer)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # (1,)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad.item())


def weights_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    return all(
        bool(torch.isfinite(t).all())
        for t in (*model.parameters(), *model.buffers())
        if t.is_floating_point()
    )


@contextlib.contextmanager
def out_of_memory_advice(args: Any) -> Iterator[None]:
    """Turn running out of (device or host) memory in a step into advice, not a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise CGCMemoryError(
            f"out of memory in a training step with per_device_train_batch_size="
            f"{args.per_device_train_batch_size} and unlabeled_batch_size="
            f"{args.unlabeled_batch_size} ({type(err).__name__}). Lower the batch sizes (keep "
            "the effective batch with gradient_accumulation_steps), lower --image_size, use "
            "mixed_precision='bf16', or a smaller model."
        ) from err


def is_write_error(err: BaseException | None, writes_into: Any = None) -> bool:
    """Whether ``err`` is how a failed file write (full disk, I/O error) shows up.

    ``OSError`` from Python; from torch's writer a ``RuntimeError`` (``basic_ios::clear:
    iostream error``, or ``[enforce fail at inline_container.cc] unexpected pos`` raised while
    it closes the half-written file); ``SafetensorError`` from safetensors. The chain of causes
    is followed, since libraries re-raise. An ``OSError`` counts when its errno says the disk
    is full, over quota or read-only, or when it names a file under ``writes_into`` (None: any
    ``OSError``).
    """
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            if err.errno in _DISK_ERRNOS or writes_into is None:
                return True
            if err.filename is not None:
                return Path(err.filename).resolve().is_relative_to(Path(writes_into).resolve())
        if type(err).__name__ == "SafetensorError":
            return True
        if isinstance(err, RuntimeError) and any(s in str(err) for s in _WRITE_FAILURES):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_WRITE_FAILURES = ("iostream", "PytorchStreamWriter", "inline_container", "No space", "write")


def write_failure(output_dir: Any, err: BaseException, intact: Any) -> CheckpointError:
    """The one-line error of a failed write into the run folder, naming what is intact."""
    advice = (
        f"checkpoint {intact} is intact: free disk space, then rerun with "
        "--resume_from_checkpoint latest"
        if intact is not None
        else "no checkpoint was saved (set checkpointing_steps to keep one): free disk space "
        "and run again"
    )
    return CheckpointError(f"could not write to {output_dir} ({first_line(err)}); {advice}.")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def nonfinite_stop(in_row: int, step: int, args: Any, last_good: Any) -> CGCError:
    """The error that stops a run after ``max_nonfinite_steps`` non-finite steps in a row."""
    where = (
        f"The last good checkpoint is {last_good}. Check the data for NaN/inf pixels, lower "
        "learning_rate, or use mixed_precision='no', then resume with "
        f"--resume_from_checkpoint {last_good}."
        if last_good is not None
        else "No checkpoint holds finite weights. Check the data for NaN/inf pixels, lower "
        "learning_rate, or use mixed_precision='no', and start again."
    )
    return CGCError(
        f"training stopped: the loss was not finite for {in_row} optimizer steps in a row (last "
        f"at step {step}; max_nonfinite_steps={args.max_nonfinite_steps}). {where}"
    )


def check_negatives(model: Any, args: Any, has_unlabeled: bool, num_processes: int) -> None:
    """Refuse a CGC run whose steps hold a single image: InfoNCE needs other images."""
    rows = args.per_device_train_batch_size + (args.unlabeled_batch_size if has_unlabeled else 0)
    if model.config.cgc_lambda > 0 and rows * num_processes < 2:
        raise CGCValueError(
            f"per_device_train_batch_size={args.per_device_train_batch_size} gives 1 image "
            "per step, and the CGC loss needs other images as negatives; use a batch size "
            ">= 2, add unlabeled data, or set cgc_lambda=0 for plain fine-tuning."
        )


def check_compile(model: nn.Module, accelerator: Any) -> None:
    """Refuse ``torch.compile`` for a CGC run whose heatmaps need a second-order gradient.

    Without a global-average-pool + linear head (ViT, Swin, ConvNeXt, ...) the heatmap is an
    autograd gradient that the CGC loss differentiates again. torch.compile's aot_autograd,
    behind inductor and the other compiling backends, has no double backward: the first step
    fails after the whole compile ("torch.compile with aot_autograd does not currently support
    double backward"). Closed-form heatmaps (ResNet, EfficientNet, ...) compile and train, and
    dynamo's ``eager`` backend, which only traces, works for every model.
    """
    from accelerate.utils import DynamoBackend

    inner = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the CGCModel
    if inner.config.cgc_lambda == 0 or inner.target.linear_head is not None:
        return
    backend = DynamoBackend(accelerator.state.dynamo_plugin.backend)
    if inner is model and backend in (DynamoBackend.NO, DynamoBackend.EAGER):
        return
    what = (
        "a torch.compile'd model"
        if inner is not model
        else f"dynamo_backend={backend.value.lower()!r} (accelerate launch --dynamo_backend, "
        "accelerate config or ACCELERATE_DYNAMO_BACKEND)"
    )
    raise CGCValueError(
        f"{what} cannot train CGC on {inner.config.architecture}: its heatmaps are autograd "
        "gradients that the CGC loss differentiates again, and torch.compile's aot_autograd "
        "has no double backward. Train it uncompiled (--dynamo_backend no, or the model before "
        "torch.compile), or use a model with a global-average-pool + linear head (ResNet, "
        "EfficientNet, RegNet...), whose closed-form heatmaps compile."
    )


def count_nonfinite(state: Any, args: Any, accelerator: Any) -> None:
    """Count a skipped (non-finite) optimizer step in ``state``, and say so."""
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    logger.warning(
        "non-finite loss at step %d: update skipped (%d in a row, %d in total; the run stops "
        "after %d in a row)",
        state.global_step,
        state.nonfinite_in_row,
        state.nonfinite_total,
        args.max_nonfinite_steps,
    )
    accelerator.log({"train/nonfinite_steps": state.nonfinite_total}, step=state.global_step)
