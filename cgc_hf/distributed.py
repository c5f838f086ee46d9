"""Cross-process gather of heatmap embeddings, so InfoNCE keeps every process's negatives.

With ``P`` processes each holding ``b`` rows, process ``p`` computes the CGC loss of its own rows
against the rows of all processes. The gather is differentiable: its backward sums, for each
process's rows, the gradients that every process's loss sends to them. The sum of the per-process
losses therefore has the gradient of ``P`` times the full-batch loss, and DDP's averaging of
parameter gradients over processes gives exactly the single-process full-batch gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if torch.distributed.is_available():
    # Imported with cgc_hf, before any process group exists. Its functions take
    # ``group=group.WORLD`` as a default argument, so a first import after the group is made
    # (timm's import does it) holds that group after ``destroy_process_group``: its gloo worker
    # threads then outlive the interpreter, and one that frees a finished collective's tensors
    # while Python exits aborts the process ("terminate called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401


def all_gather_rows(z: Tensor) -> tuple[Tensor, int]:
    """Concatenate the rows of ``z`` from every process, keeping the gradient path to each.

    Processes may hold different numbers of rows (a short last batch): rows are padded to the
    largest count for the collective and the padding is dropped again.

    Args:
        z: this process's rows, e.g. heatmap embeddings.

    Returns:
        ``(all_rows, offset)``: the rows of processes ``0..P-1`` in rank order, and the index of
        this process's first row among them. Without an initialised process group, ``(z, 0)``.

    Shape:
        z: ``(b, D)``; all_rows: ``(N, D)`` with ``N`` the sum of ``b`` over processes.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([z.shape[0]], device=z.device)  # (1,)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)  # sizes only: no gradient needed
    sizes = [int(c.item()) for c in counts]
    pad = max(sizes) - z.shape[0]
    padded = F.pad(z, (0, 0, 0, pad)) if pad else z  # (max_b, D)
    # The group is passed explicitly: the function's default was bound at import time and goes
    # stale when the process group is re-created.
    parts = all_gather(padded, group=dist.group.WORLD)  # P x (max_b, D); backward sums grads
    rows = torch.cat([p[:n] for p, n in zip(parts, sizes)])  # (N, D)
    return rows, sum(sizes[:rank])


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards ``model``'s parameters over the processes.

    Every forward of a sharded model gathers parameters from all processes, so each process must
    run the same sequence of forward passes (none may skip a batch's extra pass).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)
