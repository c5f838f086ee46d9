"""The output folder of a run: what counts as a run, when it may be replaced, its JSON records.

A run folder holds ``args.json`` (the resolved configuration), ``metrics.json`` (every
evaluation; a ``"final"`` entry marks the run finished), ``checkpoints/``, ``model/`` and
``figures/``. A finished run is never replaced without ``overwrite_output_dir``; an unfinished
one is continued with ``resume_from_checkpoint`` or replaced with ``overwrite_output_dir``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .._io import read_json, redact, write_json
from ..errors import CGCValueError, CheckpointError

ARGS_FILE = "args.json"
METRICS_FILE = "metrics.json"


class RunFolder:
    """The rules of one run's output folder.

    Args:
        path: the folder (``output_dir``).
        accelerator: the run's ``accelerate.Accelerator``; only the main process writes.
    """

    def __init__(self, path: str | Path, accelerator: Any) -> None:
        self.path = Path(path)
        self.accelerator = accelerator

    def finished(self) -> bool:
        """Whether ``metrics.json`` has a ``"final"`` entry (written last by a run)."""
        data = read_json(self.path / METRICS_FILE)
        return isinstance(data, dict) and "final" in data

    def holds_run(self) -> bool:
        return (self.path / ARGS_FILE).exists() or (self.path / "checkpoints").exists()

    def prepare(self, overwrite: bool, resume: str | None) -> None:
        """Refuse to mix two runs in one folder; replace the old run when asked to (all ranks)."""
        out = self.path
        if overwrite:
            if self.holds_run() and self.accelerator.is_main_process:
                shutil.rmtree(out)  # a previous cgc_hf run: replaced whole, never mixed
            self.accelerator.wait_for_everyone()
            return
        if self.finished():
            raise CGCValueError(
                f"output_dir={str(out)!r} already holds a finished run (metrics.json has "
                "'final'); pass overwrite_output_dir=True (--overwrite_output_dir) to replace "
                "it, or choose another output_dir."
            )
        if self.holds_run() and not resume:
            raise CGCValueError(
                f"output_dir={str(out)!r} holds an unfinished run; continue it with "
                "resume_from_checkpoint='latest' (--resume_from_checkpoint latest), replace it "
                "with overwrite_output_dir=True, or choose another output_dir."
            )

    def write_args(self, resolved: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / ARGS_FILE, resolved)

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


def resolved_config(
    args: Any, model: Any, num_processes: int, max_steps: int, steps_per_epoch: int, run: dict
) -> dict[str, Any]:
    """Everything that determines a run, as written to ``args.json`` (secrets removed)."""
    return redact(
        {
            "training_arguments": args.to_dict(),
            "cgc_config": model.config.to_dict(),
            "num_processes": num_processes,
            "max_train_steps": max_steps,
            "steps_per_epoch": steps_per_epoch,
            "run": run,
        }
    )


def tracker_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration as scalars only (TensorBoard's hparams accept nothing else)."""
    cfg = resolved["cgc_config"]
    method = ("cgc_lambda", "temperature", "cam_method", "cam_target", "compare_size", "flip_prob")
    model = ("ce_on_augmented", "library", "architecture", "num_labels", "target_layer")
    items = [*resolved["training_arguments"].items(), *((k, cfg.get(k)) for k in method + model)]
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in items}
    flat["crop_scale"] = str(cfg.get("crop_scale"))
    return flat


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
            base_model=run.get("base_model"),
            dataset=run.get("dataset"),
            label_setting=run.get("label_setting"),
            figure=figure,
        )
    except CheckpointError as err:
        if not isinstance(err.__cause__, OSError):
            raise
        advice = (
            f"checkpoint {intact_checkpoint} is intact: free disk space, then rerun with "
            "--resume_from_checkpoint latest"
            if intact_checkpoint is not None
            else "no checkpoint was saved (set checkpointing_steps to keep one): free disk "
            "space and run again"
        )
        raise CheckpointError(
            f"could not write the trained model to {folder} ({err.__cause__}); {advice}."
        ) from err
