"""The ``accelerate.Accelerator`` of a run: devices, processes, precision, trackers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def make_accelerator(args: Any, output_dir: Path) -> Any:
    """An Accelerator for the run's arguments.

    ``mixed_precision=None`` (the default) is left to Accelerate, so ``accelerate config``,
    ``accelerate launch --mixed_precision bf16`` and ``ACCELERATE_MIXED_PRECISION`` decide, as
    they do for a plain ``Accelerator()``. FSDP likewise comes from Accelerate:
    ``accelerate launch --use_fsdp --fsdp_version 2`` or an ``accelerate config`` file sets
    ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` options, and the trainer shards the model as
    :mod:`.fsdp` describes.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    acc = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.trackers,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        rng_types=[],  # data order is seeded per epoch by EpochSampler, not by global RNG
        # Without a GPU, Accelerate only forms a multi-process (gloo) group when told it runs on
        # CPU; saying so makes a plain `torchrun` on a CPU machine work too.
        cpu=not _has_accelerator(),
    )
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if asked and acc.distributed_type != DistributedType.FSDP and acc.is_main_process:
        # Accelerate turns ACCELERATE_USE_FSDP into FSDP on GPUs and other accelerators only.
        logger.warning(
            "FSDP was asked for (ACCELERATE_USE_FSDP), but Accelerate runs FSDP only on an "
            "accelerator; this run uses %s, and every process holds the whole model.",
            acc.distributed_type.value,
        )
    return acc


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()
