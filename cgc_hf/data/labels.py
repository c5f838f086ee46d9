"""Labels: the label column of both splits becomes one ``ClassLabel`` that a head can be sized to.

Integer labels keep their values (class ``k`` stays output ``k``), string labels are numbered in
sorted order, ``ClassLabel`` names are kept. What would silently give a wrong head is refused
with the fix: missing labels, a single class, labels outside the classes, and integer labels
that use only a few of the indices up to their maximum (``{0, 5, 99}`` would make a 100-class
head with 97 outputs never trained), unless ``remap_labels`` numbers them ``0..K-1``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import DataError
from .registry import DatasetSpec
from .splits import label_array

logger = logging.getLogger(__name__)

# Integer labels may leave a few indices unused (a class absent from both splits); a head with
# more unused outputs than this, and than used ones, is refused unless remapped.
SPARSE_LABEL_SLACK = 16


def cast_labels(
    train: Any,
    evald: Any | None,
    spec: DatasetSpec,
    remap_labels: bool = False,
    min_classes: int = 2,
) -> tuple[Any, Any | None, list[str]]:
    """Make the label column a ``ClassLabel`` with the same names in both splits.

    Args:
        train: training split (``datasets.Dataset``).
        evald: eval split, or None.
        spec: names the label column (and a column naming integer labels).
        remap_labels: number the integer label values that occur ``0..K-1`` in sorted order
            (class names keep the original values); logged with the mapping.
        min_classes: fewest classes accepted, in the names and in the training split (1 for
            an evaluation that ignores the labels).

    Returns:
        ``(train, eval, names)`` with the column cast.

    Raises:
        DataError: missing labels, a type that is not a class, labels outside the classes,
            sparse integer labels without ``remap_labels``, or fewer than two classes.
    """
    import datasets

    col = spec.label_column
    parts = [d for d in (train, evald) if d is not None]
    for d in parts:
        _check_no_nulls(d, col, spec.name)
    feats = [d.features[col] for d in parts]
    class_feats = [f for f in feats if isinstance(f, datasets.ClassLabel)]
    if len(class_feats) == 2 and class_feats[0].names != class_feats[1].names:
        raise DataError(
            f"dataset {spec.name!r}: the train and eval splits name their classes differently "
            f"in column {col!r} ({len(class_feats[0].names)} vs {len(class_feats[1].names)} names)."
        )
    if class_feats:
        names = list(class_feats[0].names)
    elif all(_is_int(f) for f in feats):
        values = np.unique(np.concatenate([label_array(d, col) for d in parts]))  # sorted
        if values.size and values[0] >= 0:
            if remap_labels:
                parts = [_renumber(d, col, values) for d in parts]
                logger.warning(
                    "dataset %r: the label values are numbered 0..%d in sorted order "
                    "(remap_labels): %s; the class names keep the values.",
                    spec.name, values.size - 1, _mapping(values),
                )  # fmt: skip
            else:
                _check_dense(values, col, spec.name)
        count = values.size if remap_labels else (int(values.max()) + 1 if values.size else 0)
        original = values.tolist() if remap_labels else list(range(count))
        names = [str(v) for v in original]
        if spec.label_names_column is not None and spec.label_names_column in train.column_names:
            # Name each integer by the first row that carries it (dict keeps the first).
            pairs = zip(label_array(parts[0], col).tolist(), train[spec.label_names_column][:])
            named: dict[int, str] = {}
            for value, label_name in pairs:
                named.setdefault(int(value), str(label_name))
            names = [named.get(i, names[i]) for i in range(count)]
    elif all(_is_str(f) for f in feats):
        names = sorted({str(v) for d in parts for v in d[col][:]})
    else:
        raise DataError(
            f"label column {col!r} of dataset {spec.name!r} has type {feats[0]}; it needs integer, "
            "string or ClassLabel values (one class per image). Choose another with "
            "--label_column_name."
        )
    if not names:
        raise DataError(f"dataset {spec.name!r} has no labels in column {col!r}.")
    target = datasets.ClassLabel(names=names)
    out = []
    for d in parts:
        f = d.features[col]
        if _is_str(f) or not isinstance(f, datasets.ClassLabel) or f.names != names:
            # cast_column with ClassLabel(names=...) keeps integer values as they are; it never
            # renumbers them (class_encode_column would, lexicographically).
            d = d.cast_column(col, target)
        _check_range(d, col, len(names), spec.name)
        out.append(d)
    present = np.unique(label_array(out[0], col))
    if len(names) < min_classes or present.size < min_classes:
        shown = f"{len(names)} class" + ("es" if len(names) != 1 else "")
        raise DataError(
            f"dataset {spec.name!r} has {shown} in column {col!r} and {present.size} in its "
            f"training split ({[names[int(i)] for i in present[:5]]}); a classifier needs at least "
            "two (one class would train a constant model that scores 100%). Check "
            "--label_column_name, or add images of the other classes."
        )
    return out[0], (out[1] if evald is not None else None), names


def _check_no_nulls(ds: Any, col: str, name: str) -> None:
    column = ds.with_format("arrow")[col]  # respects select / shuffle
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"dataset {name!r}: {column.null_count} of {len(ds)} rows have no label in column "
            f"{col!r} (None), e.g. row {first}. Drop them (ds.filter(lambda r: r[{col!r}] is not "
            "None)) or pass them as unlabeled images (--unlabeled_dataset)."
        )


def _check_dense(values: np.ndarray, col: str, name: str) -> None:
    """Refuse integer labels that would leave most of a ``max + 1`` head untrained."""
    count = int(values[-1]) + 1
    unused = count - values.size
    if unused > max(values.size, SPARSE_LABEL_SLACK):
        raise DataError(
            f"dataset {name!r}: the integer labels in column {col!r} use {values.size} of the "
            f"{count} class indices 0..{count - 1} ({_shown(values)}), so a {count}-class head "
            f"would have {unused} outputs never trained. Pass --remap_labels "
            "(load_splits(remap_labels=True)) to number them 0.."
            f"{values.size - 1}, or cast the column to ClassLabel(names=...)."
        )


def _renumber(ds: Any, col: str, values: np.ndarray) -> Any:
    import datasets

    def renumber(batch: dict[str, list]) -> dict[str, Any]:
        return {col: np.searchsorted(values, np.asarray(batch[col]))}

    # In memory: a dataset loaded from disk must not get cache files written beside it.
    ds = ds.map(renumber, batched=True, keep_in_memory=True)
    return ds.cast_column(col, datasets.Value("int64"))


def _shown(values: np.ndarray, n: int = 8) -> str:
    head = ", ".join(str(int(v)) for v in values[:n])
    return f"values {head}" + (f", ... ({values.size} in all)" if values.size > n else "")


def _mapping(values: np.ndarray, n: int = 8) -> str:
    pairs = ", ".join(f"{int(v)} -> {k}" for k, v in enumerate(values[:n]))
    return pairs + (f", ... ({values.size} in all)" if values.size > n else "")


def _is_int(feature: Any) -> bool:
    dtype = getattr(feature, "dtype", "")
    return isinstance(dtype, str) and dtype.startswith(("int", "uint"))


def _is_str(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_range(ds: Any, col: str, num_labels: int, name: str) -> None:
    values = label_array(ds, col)
    bad = np.nonzero((values < 0) | (values >= num_labels))[0]
    if bad.size:
        raise DataError(
            f"dataset {name!r}: {bad.size} labels in column {col!r} are outside [0, "
            f"{num_labels}), e.g. {int(values[bad[0]])} at row {int(bad[0])}. Drop those rows "
            "(or use them as the unlabeled pool) before training."
        )
