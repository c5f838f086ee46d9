"""Guards of a training step: a non-finite loss skips the update, running out of memory is advice.

A batch whose loss is NaN or inf (a corrupt image, an overflow) must not reach the weights: its
backward still runs, so every process takes part in DDP's gradient reduction, but the optimizer
step is skipped, the gradients are dropped, and the BatchNorm running statistics that the batch
moved are put back. Every process decides alike (the verdict is summed over processes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CGCMemoryError


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


def is_write_error(err: BaseException | None) -> bool:
    """Whether ``err`` is how a failed file write (full disk, I/O error) shows up.

    ``OSError`` from Python, ``RuntimeError`` from torch's writer (``basic_ios::clear: iostream
    error``, ``PytorchStreamWriter failed writing file``), ``SafetensorError`` from safetensors.
    """
    if err is None:
        return False
    if isinstance(err, OSError):
        return True
    if type(err).__name__ == "SafetensorError":
        return True
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("iostream", "PytorchStreamWriter", "No space", "write")
    )


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
