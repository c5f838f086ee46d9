"""Checkpoints of a training run: atomic save, verification, prune, partial clean-up, resume.

A checkpoint is ``output_dir/checkpoints/step_<N>``: Accelerate's state (model, optimizer,
scheduler, RNG), ``run.json`` (the run's resolved configuration, so a resume can tell what
changed) and a ``COMPLETE`` marker holding the :class:`TrainerState`, the size and SHA-256 of
every other file, and whether the weights were finite. It is written under a temporary name, the
marker last, and renamed once complete, so a crash or a full disk at any point leaves earlier
checkpoints untouched and no folder that looks complete.

Before a checkpoint is used it is verified against its marker: a truncated, missing or foreign
file (an RNG state copied from another run, say) makes it damaged. ``'latest'`` then falls back
to the newest intact checkpoint, with a warning that names the damaged one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import read_json, write_json
from ..errors import CheckpointError
from .guards import first_line, is_write_error, weights_finite

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
COMPLETE = "COMPLETE"  # marker file: its presence makes a checkpoint directory usable
PARTIAL_PREFIX = ".tmp-"
RUN_CONFIG = "run.json"


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
    best_metric: float | None = None  # of metric_for_best_model, at best_step
    best_step: int | None = None


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
        self.keep: Path | None = None  # the best model's checkpoint, kept from pruning

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.output_dir)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def save(self, state: TrainerState, model: Any, run_config: dict[str, Any]) -> Path:
        """Save the full training state as ``step_<global_step>``, atomically (every process).

        Args:
            state: the trainer's state, written into the ``COMPLETE`` marker.
            model: the (unwrapped) model, whose weights are checked for finiteness.
            run_config: the run's resolved configuration, written as ``run.json``.
        """
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if (final / COMPLETE).exists():
            return final
        tmp = self.root / f"{PARTIAL_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        finite = weights_finite(model)
        try:
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json(tmp / RUN_CONFIG, run_config)
                marker = {**dataclasses.asdict(state), "weights_finite": finite}
                marker["files"] = _file_digests(tmp)
                write_json(tmp / COMPLETE, marker)
                os.replace(tmp, final)
        except Exception as err:  # torch and safetensors report a full disk in their own types
            if not is_write_error(err):
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write checkpoint {final} ({first_line(err)}); the previous "
                f"checkpoint {self.latest() or '(none)'} is intact. Free disk space in "
                f"{self.root}, then resume with --resume_from_checkpoint latest."
            ) from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.prune()
        logger.info("saved checkpoint %s", final)
        return final

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``total_limit`` (never ``self.keep``)."""
        if self.total_limit is None:
            return
        for old in self.complete()[: -self.total_limit]:
            if old != self.keep:
                shutil.rmtree(old)

    def clean_partial(self) -> None:
        """Remove checkpoints that were interrupted while saving (they have no marker)."""
        if not self.root.exists():
            return
        for tmp in self.root.glob(f"{PARTIAL_PREFIX}*"):
            logger.warning("removing incomplete checkpoint %s (interrupted while saving)", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def problem(self, path: Path) -> str | None:
        """What is damaged in checkpoint ``path`` (None when it is intact)."""
        marker = read_json(path / COMPLETE)
        if not isinstance(marker, dict) or "global_step" not in marker:
            return f"{COMPLETE} is not a readable marker"
        files = marker.get("files")
        if not isinstance(files, dict):
            return None  # written before checkpoints recorded their files: nothing to compare
        on_disk = {
            str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != COMPLETE
        }
        missing = sorted(set(files) - on_disk)
        if missing:
            return f"{missing[0]} is missing"
        for name, want in sorted(files.items()):
            file = path / name
            if file.stat().st_size != want["size"]:
                return f"{name} has {file.stat().st_size} bytes, {want['size']} were written"
            if _sha256(file) != want["sha256"]:
                return f"{name} is not the file that was written (its checksum differs)"
        return None

    def intact(self) -> list[Path]:
        """Complete checkpoints that verify, newest first; a warning names each damaged one."""
        good = []
        for path in reversed(self.complete()):
            problem = self.problem(path)
            if problem is None:
                good.append(path)
            else:
                logger.warning("checkpoint %s is damaged (%s); it is skipped", path, problem)
        return good

    def last_good(self) -> Path | None:
        """The newest intact checkpoint whose weights are finite (None if there is none)."""
        for path in self.intact():
            if (read_json(path / COMPLETE) or {}).get("weights_finite", True):
                return path
        return None

    def find(self, target: str) -> Path | None:
        """The checkpoint ``resume_from_checkpoint=target`` names (``'latest'`` or a path)."""
        if target == "latest":
            complete = self.complete()
            intact = self.intact()
            if intact:
                if intact[0] != complete[-1]:
                    logger.warning("resuming from %s, the newest intact checkpoint", intact[0])
                return intact[0]
            if complete:
                raise CheckpointError(
                    f"resume_from_checkpoint='latest': every checkpoint in {self.root} is "
                    f"damaged (newest: {complete[-1]}: {self.problem(complete[-1])}); replace the "
                    "run with --overwrite_output_dir, or restore the checkpoint files."
                )
            logger.warning(
                "resume_from_checkpoint='latest': no complete checkpoint in %s; "
                "training from the start.",
                self.root,
            )
            return None
        path = Path(target)
        if not (path / COMPLETE).exists():
            raise CheckpointError(
                f"resume_from_checkpoint={target!r} is not a complete checkpoint (no "
                f"{COMPLETE} marker); use 'latest' or one of "
                f"{[str(p) for p in self.complete()] or '(none)'}."
            )
        problem = self.problem(path)
        if problem is not None:
            raise CheckpointError(
                f"resume_from_checkpoint={target!r} is damaged: {problem}. Use 'latest' (the "
                "newest intact checkpoint) or another one."
            )
        return path

    def load(self, path: Path) -> TrainerState:
        """Restore Accelerate's state from ``path`` (every process) and return the trainer state."""
        saved = read_json(path / COMPLETE)
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: {COMPLETE} is not readable JSON.")
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run ({type(err).__name__}: "
                f"{first_line(err)}); resume it with the model and options that wrote it."
            ) from err
        names = {f.name for f in dataclasses.fields(TrainerState)}
        return TrainerState(**{k: v for k, v in saved.items() if k in names})

    def run_config(self, path: Path) -> dict[str, Any] | None:
        """The resolved configuration of the run that wrote checkpoint ``path``."""
        data = read_json(path / RUN_CONFIG)
        return data if isinstance(data, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
