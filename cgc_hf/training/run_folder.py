"""The output folder of a run: what a run owns in it, when it may be replaced, its JSON records.

A run folder holds ``args.json`` (the resolved configuration), ``metrics.json`` (every
evaluation; a ``"final"`` entry marks the run finished), ``split.json``, ``checkpoints/``,
``model/``, ``figures/`` and ``logs/``, plus ``.cgc_run.json``, the manifest that says a cgc_hf
run made them. Only what a run of ours writes is ever deleted: replacing a run removes the
entries above by their own names and patterns and keeps every other file (with a warning), and a
folder without our manifest is never emptied.

While a run uses its folder it holds an OS-level lock on ``.cgc_run.lock`` (``fcntl.flock``), so a
second run into the same folder stops at once; the lock dies with the process, so a run killed
with ``kill -9`` leaves no stale lock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .._io import read_json, redact, write_json
from ..config import METHOD_FIELDS
from ..errors import CGCValueError, CheckpointError
from .checkpoints import CHECKPOINT_PREFIX, COMPLETE, PARTIAL_PREFIX
from .guards import first_line, is_write_error

logger = logging.getLogger(__name__)

ARGS_FILE = "args.json"
METRICS_FILE = "metrics.json"
MANIFEST = ".cgc_run.json"
LOCK = ".cgc_run.lock"
FORMAT = 1
# What a run writes at the top of its folder: name -> pattern of the names it writes inside
# (None: a file, or a folder written whole by us).
OWNED: dict[str, re.Pattern | None] = {
    ARGS_FILE: None,
    METRICS_FILE: None,
    "split.json": None,
    "checkpoints": re.compile(rf"({re.escape(PARTIAL_PREFIX)})?{CHECKPOINT_PREFIX}\d+"),
    "figures": re.compile(r"step_\d+\.png"),
    "logs": re.compile(r"cgc_hf"),
    "model": None,
}
# Temporary siblings of our atomic writes (_io.write_json, _io.replace_folder).
_LEFTOVER = re.compile(r"\.(args\.json|metrics\.json|split\.json|model)\.(tmp|old)-[0-9a-f]{8}")


class RunFolder:
    """The rules of one run's output folder.

    Args:
        path: the folder (``output_dir``).
        accelerator: the run's ``accelerate.Accelerator``; only the main process writes.
    """

    def __init__(self, path: str | Path, accelerator: Any) -> None:
        self.path = Path(path)
        self.accelerator = accelerator
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------ state
    def ours(self) -> bool:
        """Whether a cgc_hf run made this folder (its manifest is there)."""
        data = read_json(self.path / MANIFEST)
        return isinstance(data, dict) and data.get("format") == FORMAT

    def finished(self) -> bool:
        """Whether ``metrics.json`` has a ``"final"`` entry (written last by a run)."""
        data = read_json(self.path / METRICS_FILE)
        return isinstance(data, dict) and "final" in data

    def resumable(self) -> bool:
        """Whether a checkpoint with its ``COMPLETE`` marker is there to continue from."""
        root = self.path / "checkpoints"
        return root.is_dir() and any((p / COMPLETE).exists() for p in root.iterdir())

    def foreign(self) -> list[str]:
        """Entries with the names a run writes that no run of ours wrote (no manifest)."""
        if self.ours() or not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name in OWNED)

    # ------------------------------------------------------------------------------ prepare
    def prepare(self, overwrite: bool, resume: str | None) -> None:
        """Lock the folder; refuse to mix two runs; replace ours when asked (all processes).

        Raises:
            CGCValueError: the folder is a file, is not writable, is in use by another run,
                holds a finished run (without ``overwrite``), holds an unfinished run that can be
                resumed (without ``resume`` or ``overwrite``), or holds files named like a run's
                that no run of ours wrote.
        """
        acc = self.accelerator
        if acc.is_main_process:
            try:
                self._prepare(overwrite, resume)
            except BaseException:
                self.release()
                raise
        acc.wait_for_everyone()

    def _prepare(self, overwrite: bool, resume: str | None) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise CGCValueError(
                f"output_dir={str(out)!r} is a file; give the path of a folder (new or empty)."
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as err:  # not writable, a path through a file, a read-only disk
            raise CGCValueError(
                f"output_dir={str(out)!r} cannot be created or written ({err.strerror or err}); "
                "choose a folder you can write to."
            ) from None
        foreign = self.foreign()
        if foreign:
            raise CGCValueError(
                f"output_dir={str(out)!r} holds {foreign}, which no cgc_hf run wrote (there is "
                f"no {MANIFEST}); a run never deletes or mixes into files it did not write, so "
                "choose another output_dir or move them."
            )
        if self.ours() and overwrite:
            self.clear()
        elif self.finished():
            raise CGCValueError(
                f"output_dir={str(out)!r} already holds a finished run (metrics.json has "
                "'final'); pass overwrite_output_dir=True (--overwrite_output_dir) to replace "
                "it, or choose another output_dir."
            )
        elif self.resumable() and not resume:
            raise CGCValueError(
                f"output_dir={str(out)!r} holds an unfinished run; continue it with "
                "resume_from_checkpoint='latest' (--resume_from_checkpoint latest), replace it "
                "with overwrite_output_dir=True, or choose another output_dir."
            )
        elif self.ours() and not self.resumable():
            # Stopped before its first checkpoint (a data error, say): nothing to continue.
            if (out / ARGS_FILE).exists():
                logger.warning("replacing the run in %s: it stopped before any checkpoint", out)
            self.clear()
        write_json(out / MANIFEST, {"format": FORMAT, "owned": sorted(OWNED)})

    def clear(self) -> None:
        """Delete what a run of ours wrote here, by name; keep (and name) everything else."""
        kept = []
        for entry in sorted(self.path.iterdir()):
            if entry.name in (MANIFEST, LOCK):
                continue
            if _LEFTOVER.fullmatch(entry.name):
                _remove(entry)
            elif entry.name not in OWNED:
                kept.append(entry.name)
            elif OWNED[entry.name] is None or not entry.is_dir():
                _remove(entry)
            else:
                pattern = OWNED[entry.name]
                for child in entry.iterdir():
                    if pattern.fullmatch(child.name):
                        _remove(child)
                    else:
                        kept.append(f"{entry.name}/{child.name}")
                if not any(entry.iterdir()):
                    entry.rmdir()
        if kept:
            logger.warning(
                "replacing the run in %s; kept %d entries no run writes: %s",
                self.path,
                len(kept),
                kept[:8],
            )

    # ------------------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Take the folder's lock for this process (main process only; idempotent)."""
        if self.accelerator.is_main_process:
            self._lock()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CGCValueError(
                f"output_dir={str(self.path)!r} is in use by another run (process {holder}); "
                "wait for it to end, or choose another output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Give the folder's lock back (the process ending does it too)."""
        if self._lock_fd is not None:
            import fcntl

            # Unlock explicitly: DataLoader workers forked during the run share the descriptor,
            # and closing only this copy would leave the folder locked while they live.
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------------------ records
    def write_args(self, resolved: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            write_json(self.path / ARGS_FILE, resolved)

    def record_args(
        self,
        resolved: dict[str, Any],
        resumed_from: Path | None,
        step: int,
        changes: dict[str, list[Any]],
    ) -> None:
        """Write ``args.json``; a resume keeps the original record and appends itself to it."""
        previous = self.read_args() if resumed_from is not None else None
        if previous is not None:
            resumes = previous.pop("resumes", [])
            resumes.append({"step": step, "from": str(resumed_from), "changed": changes})
            resolved = {**previous, "resumes": resumes}
        self.write_args(resolved)

    def read_args(self) -> dict[str, Any] | None:
        data = read_json(self.path / ARGS_FILE)
        return data if isinstance(data, dict) else None

    def write_metrics(
        self, evaluations: list[dict[str, Any]], final: dict[str, Any] | None = None
    ) -> None:
        """Write ``metrics.json``; with ``final`` it marks the run as finished."""
        if not self.accelerator.is_main_process:
            return
        data: dict[str, Any] = {"evaluations": evaluations}
        if final is not None:
            data["final"] = final
        write_json(self.path / METRICS_FILE, data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def resolved_config(
    args: Any,
    model: Any,
    num_processes: int,
    max_steps: int,
    steps_per_epoch: int,
    images: dict[str, int],
    run: dict,
) -> dict[str, Any]:
    """Everything that determines a run, as written to ``args.json`` (secrets removed).

    ``images`` counts the labeled, unlabeled and eval images the trainer was given.
    """
    return redact(
        {
            "training_arguments": args.to_dict(),
            "cgc_config": model.config.to_dict(),
            "num_processes": num_processes,
            "max_train_steps": max_steps,
            "steps_per_epoch": steps_per_epoch,
            "images": images,
            "run": run,
        }
    )


def tracker_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration as scalars only (TensorBoard's hparams accept nothing else)."""
    cfg = resolved["cgc_config"]
    model = ("library", "architecture", "num_labels", "target_layer")
    items = [*resolved["training_arguments"].items()]
    items += [(k, cfg.get(k)) for k in (*METHOD_FIELDS, *model)]
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in items}


def save_final_model(
    model: Any,
    folder: Path,
    metrics: dict[str, Any],
    run: dict[str, Any],
    figure: Path | None,
    intact_checkpoint: Path | None,
) -> Path:
    """Save the trained model with ``save_pretrained``; a full disk names what is still intact.

    The folder loads with ``CGCModel.from_pretrained``; its model card carries the ``eval_*``
    numbers of ``metrics``.
    """
    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("eval_") and isinstance(v, (int, float))
    }
    try:
        return model.save_pretrained(
            folder,
            metrics=numbers,
            dataset=run.get("dataset"),
            label_setting=run.get("label_setting"),
            figure=figure,
        )
    except CheckpointError as err:
        if not is_write_error(err.__cause__):
            raise
        cause = err.__cause__
    except Exception as err:  # torch / safetensors report a full disk as their own errors
        if not is_write_error(err):
            raise
        cause = err
    advice = (
        f"checkpoint {intact_checkpoint} is intact: free disk space, then rerun with "
        "--resume_from_checkpoint latest"
        if intact_checkpoint is not None
        else "no checkpoint was saved (set checkpointing_steps to keep one): free disk "
        "space and run again"
    )
    raise CheckpointError(
        f"could not write the trained model to {folder} ({first_line(cause)}); {advice}."
    ) from cause
