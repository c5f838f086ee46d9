"""Label-limited splits: which rows keep their label, a held-out eval slice, the split on disk.

Example:
    >>> labeled, unlabeled = split_labeled(splits.train, labels_per_class=5, seed=0)
    >>> save_split("run/split.json", labeled, unlabeled, {"seed": 0})
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_file
from ..errors import DataError, close_matches, first_line


def label_array(ds: Any, column: str) -> np.ndarray:
    """The label column as an array, honouring the dataset's index mapping (select/shuffle)."""
    return np.asarray(ds.with_format("numpy")[column][:])


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified hold-out: about ``fraction`` of each class, never its last example."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1); got {fraction!r}.")
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        held.extend(idx[: min(int(round(fraction * idx.size)), idx.size - 1)].tolist())
    held_set = set(held)
    return [i for i in range(labels.size) if i not in held_set], sorted(held)


def split_labeled(
    dataset: Any,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    *,
    label_column: str = "label",
) -> tuple[list[int], list[int]]:
    """Choose which rows keep their label; the rest form the unlabeled pool.

    Exactly one of ``labels_per_class`` (exactly K rows of every class) or ``label_fraction``
    (``round(p * n_c)`` rows of each class c, at least one) must be given. The choice depends
    only on the labels and ``seed``.

    Args:
        dataset: a ``datasets.Dataset`` (labels read from ``label_column``) or a sequence of
            integer labels.
        labels_per_class: K labeled rows per class.
        label_fraction: share p in (0, 1] of each class that stays labeled.
        seed: seed of the choice.
        label_column: label column of a ``datasets.Dataset`` (``Splits.spec.label_column``).

    Returns:
        ``(labeled_idx, unlabeled_idx)``, sorted, disjoint, together every row.

    Raises:
        DataError: both or neither option given, or a class has fewer than K rows.
    """
    if (labels_per_class is None) == (label_fraction is None):
        raise DataError(
            "split_labeled needs exactly one of labels_per_class or label_fraction; got "
            f"labels_per_class={labels_per_class!r}, label_fraction={label_fraction!r}."
        )
    labels, names = _labels_and_names(dataset, label_column)
    classes = range(len(names)) if names is not None else np.unique(labels).tolist()
    if labels_per_class is not None and not (
        isinstance(labels_per_class, int) and labels_per_class >= 1
    ):
        raise DataError(f"labels_per_class must be an integer >= 1; got {labels_per_class!r}.")
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise DataError(f"label_fraction must be in (0, 1]; got {label_fraction!r}.")
    rng = np.random.default_rng(seed)
    labeled: list[int] = []
    for c in classes:
        idx = np.nonzero(labels == c)[0]
        name = f"{c} ({names[c]!r})" if names is not None else str(c)
        if labels_per_class is not None:
            if idx.size < labels_per_class:
                raise DataError(
                    f"class {name} has {idx.size} rows, fewer than labels_per_class="
                    f"{labels_per_class}; lower it or use label_fraction."
                )
            take = labels_per_class
        else:
            if idx.size == 0:
                continue
            take = min(idx.size, max(1, int(round(label_fraction * idx.size))))
        labeled.extend(rng.permutation(idx)[:take].tolist())
    labeled.sort()
    chosen = set(labeled)
    return labeled, [i for i in range(labels.size) if i not in chosen]


def _labels_and_names(dataset: Any, column: str) -> tuple[np.ndarray, list[str] | None]:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        if column not in dataset.column_names:
            raise DataError(
                f"label_column {column!r} is not a column of the dataset; its columns are "
                f"{dataset.column_names}.{close_matches(column, dataset.column_names)}"
            )
        feat = dataset.features[column]
        names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        return label_array(dataset, column).astype(np.int64), names
    return np.asarray(list(dataset), dtype=np.int64), None


def save_split(
    path: str | os.PathLike,
    labeled_idx: Sequence[int],
    unlabeled_idx: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a labeled / unlabeled split as JSON (atomically), so a run can record and reuse it."""
    payload = {
        "labeled_idx": [int(i) for i in labeled_idx],
        "unlabeled_idx": [int(i) for i in unlabeled_idx],
        "meta": dict(meta or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload)  # one line: a split can hold a million indices
    write_file(path, lambda tmp: tmp.write_text(text))


def load_split(path: str | os.PathLike) -> tuple[list[int], list[int], dict[str, Any]]:
    """Read what :func:`save_split` wrote: ``(labeled_idx, unlabeled_idx, meta)``."""
    try:
        payload = json.loads(Path(path).read_text())
        return list(payload["labeled_idx"]), list(payload["unlabeled_idx"]), payload["meta"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read a split from {str(path)!r}: {first_line(err)}") from err
