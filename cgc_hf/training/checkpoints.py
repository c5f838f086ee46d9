"""Checkpoints of a training run: atomic save, prune, clean-up of partial saves, resume.

A checkpoint is ``output_dir/checkpoints/step_<N>``: Accelerate's state (model, optimizer,
scheduler, RNG) plus a ``COMPLETE`` marker holding the :class:`TrainerState` as JSON. It is
written under a temporary name, the marker last, and renamed once complete, so a crash or a full
disk at any point leaves earlier checkpoints untouched and no folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import read_json, write_json
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
COMPLETE = "COMPLETE"  # marker file: its presence makes a checkpoint directory usable
PARTIAL_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    """Everything beyond Accelerate's state that a resumed run needs (saved in ``COMPLETE``)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # labeled batches of this process already used in ``epoch``
    unlabeled_epoch: int = 0
    unlabeled_batches: int = 0  # unlabeled batches already used in ``unlabeled_epoch``
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    loss_sum: float = 0.0  # over finite batches since step 0: a resumed run reports the same mean
    loss_batches: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        step = p.name[len(CHECKPOINT_PREFIX) :]
        if p.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (p / COMPLETE).exists():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; partial (interrupted) ones are ignored."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointManager:
    """Save, prune and find the checkpoints of one run folder.

    Args:
        output_dir: the run folder; checkpoints go to its ``checkpoints/``.
        accelerator: the run's ``accelerate.Accelerator`` (all processes call :meth:`save`).
        total_limit: keep at most this many complete checkpoints (oldest deleted); None keeps all.
    """

    def __init__(self, output_dir: Path, accelerator: Any, total_limit: int | None) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.accelerator = accelerator
        self.total_limit = total_limit

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.output_dir)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def save(self, state: TrainerState) -> Path:
        """Save the full training state as ``step_<global_step>``, atomically (every process)."""
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if (final / COMPLETE).exists():
            return final
        tmp = self.root / f"{PARTIAL_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json(tmp / COMPLETE, dataclasses.asdict(state))
                os.replace(tmp, final)
        except OSError as err:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write checkpoint {final} ({err}); the previous checkpoint "
                f"{self.latest() or '(none)'} is intact. Free disk space in {self.root}, then "
                "resume with --resume_from_checkpoint latest."
            ) from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.prune()
        logger.info("saved checkpoint %s", final)
        return final

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``total_limit``."""
        if self.total_limit is None:
            return
        for old in self.complete()[: -self.total_limit]:
            shutil.rmtree(old)

    def clean_partial(self) -> None:
        """Remove checkpoints that were interrupted while saving (they have no marker)."""
        if not self.root.exists():
            return
        for tmp in self.root.glob(f"{PARTIAL_PREFIX}*"):
            logger.warning("removing incomplete checkpoint %s (interrupted while saving)", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def find(self, target: str) -> Path | None:
        """The checkpoint ``resume_from_checkpoint=target`` names (``'latest'`` or a path)."""
        if target == "latest":
            path = self.latest()
            if path is None:
                logger.warning(
                    "resume_from_checkpoint='latest': no complete checkpoint in %s; "
                    "training from the start.",
                    self.root,
                )
            return path
        path = Path(target)
        if not (path / COMPLETE).exists():
            raise CheckpointError(
                f"resume_from_checkpoint={target!r} is not a complete checkpoint (no "
                f"{COMPLETE} marker); use 'latest' or one of "
                f"{[str(p) for p in self.complete()] or '(none)'}."
            )
        return path

    def load(self, path: Path) -> TrainerState:
        """Restore Accelerate's state from ``path`` (every process) and return the trainer state."""
        saved = read_json(path / COMPLETE)
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: {COMPLETE} is not readable JSON.")
        self.accelerator.load_state(str(path))
        return TrainerState(**saved)
