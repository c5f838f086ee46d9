"""The ``accelerate.Accelerator`` of a run: devices, processes, precision, trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_accelerator(args: Any, output_dir: Path) -> Any:
    """An Accelerator for the run's arguments.

    ``mixed_precision=None`` (the default) is left to Accelerate, so ``accelerate config``,
    ``accelerate launch --mixed_precision bf16`` and ``ACCELERATE_MIXED_PRECISION`` decide, as
    they do for a plain ``Accelerator()``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
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


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()
