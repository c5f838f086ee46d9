"""What a resumed run may change: the saved run configuration against the new one.

A checkpoint carries the resolved configuration of the run that wrote it (``run.json``). A resume
with other options would continue a run that no configuration describes: the weights match
neither the old run nor a new one, and the record would claim the new options made them. So a
difference that changes the result is refused, listing the fields, unless
``allow_config_change=True``; ``args.json`` then keeps both, the original and each resume.
A few differences cannot be allowed at all: the optimizer's state, the weights' shapes and the
per-process RNG states only fit the run that saved them.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError

# Options that change what is logged, saved or checked, never the weights or the metrics.
HARMLESS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "allow_config_change",
        "report_to",
        "logging_steps",
        "eval_steps",
        "eval_insertion_steps",
        "per_device_eval_batch_size",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "figure_images",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "max_nonfinite_steps",
        "command_line",
        "config_file",
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "cache_dir",
        "dataset_source",
        "on_bad_image",
        "gradient_checkpointing",  # the same values (tests/test_gradient_checkpointing.py)
    }
)
# Differences the saved state cannot follow, even when allowed.
IMPOSSIBLE = frozenset(
    {"optim", "library", "architecture", "backbone_config", "num_labels", "num_processes"}
)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("backbone_config", "data_config", "target"):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Fields whose value differs in a way that changes the result: ``{field: [saved, new]}``."""
    old, now = flatten(saved), flatten(new)
    changes, seen = {}, set()
    for key in sorted(set(old) | set(now), key=lambda k: (k.count("."), k)):
        name = key.rsplit(".", 1)[-1]
        if name in HARMLESS or name in seen:  # a field recorded twice is listed once
            continue
        a, b = old.get(key), now.get(key)
        if _normal(a) != _normal(b):
            changes[key] = [a, b]
            seen.add(name)
    return changes


def check_resume(
    saved: dict[str, Any] | None, new: dict[str, Any], checkpoint: Any, allow: bool
) -> dict[str, list[Any]]:
    """Refuse a resume whose configuration differs from the checkpoint's (unless ``allow``).

    Returns:
        The allowed differences (empty when nothing changed).

    Raises:
        CheckpointError: a difference that changes the result without ``allow``, or one that the
            saved state cannot follow at all.
    """
    if saved is None:
        return {}  # a checkpoint written before checkpoints recorded their configuration
    changes = config_changes(saved, new)
    if not changes:
        return {}
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:8])
    impossible = [k for k in changes if k.rsplit(".", 1)[-1] in IMPOSSIBLE]
    if impossible:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written by a run with other {impossible} ({listing}); "
            "its saved state (optimizer, weights, per-process RNG) only fits that run. Resume "
            "with the same options, or start a new run in another output_dir."
        )
    if not allow:
        raise CheckpointError(
            f"resuming from {checkpoint} with options that change the result: {listing}. "
            "Resume with the options of the saved run (its args.json), start a new run in "
            "another output_dir, or pass --allow_config_change to continue anyway (args.json "
            "then records both)."
        )
    return changes


def _normal(value: Any) -> Any:
    """Tuples and lists compare equal (JSON has only lists); ints and equal floats too."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    return value
