"""Columns: which one holds the image, the label and the object (a mask or a box).

For a dataset outside the registry the columns are found from the features: the image is an
``Image`` column (an ``Array2D`` / ``Array3D`` one where there is none), the label a
``ClassLabel`` (or a column named ``label`` / ``labels``), a mask an ``Image`` column whose name
says mask or segmentation, a box a column of 4 numbers (or of named fields) whose name says box.
What is found is logged; where two columns could be the mask (or the box) none is taken, and the
log says which flag names one. Named columns are checked like the image and label: a missing one
lists the columns there are, with close matches.

Example:
    >>> spec = find_columns("my-data", None, dataset_dict)
    >>> spec.image_column, spec.label_column, spec.mask_column, spec.box_column
    ('image', 'label', 'segmentation', None)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..errors import DataError, close_matches
from .annotations import BOX_FIELD_NAMES, check_boxes, infer_mask_rule
from .images import array_to_image
from .registry import DatasetSpec

logger = logging.getLogger(__name__)

EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
MASK_WORDS = ("mask", "seg", "trimap", "matte")
BOX_WORDS = ("bbox", "box", "bounding")
_SAMPLE_MASKS = 16  # masks read to decide which values are the object
_SAMPLE_BOXES = 256  # boxes read to check them against the box format
_FLAGS = {
    "image_column": "--image_column_name",
    "label_column": "--label_column_name",
    "mask_column": "--mask_column_name",
    "box_column": "--box_column_name",
}


def find_columns(name: str, hub_id: str | None, dd: Any) -> DatasetSpec:
    """Find the columns of a dataset outside the registry from its features (logged)."""
    import datasets

    first = next(iter(dd.values()))
    feats = first.features
    images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
    if not images:  # pixel arrays stored as Array2D / Array3D columns
        arrays = (datasets.Array2D, datasets.Array3D)
        images = [c for c, f in feats.items() if isinstance(f, arrays)]
    mask_like = [c for c in images if _says(c, MASK_WORDS)]
    inputs = [c for c in images if c not in mask_like] or images
    image = "image" if "image" in inputs else (inputs[0] if inputs else "image")
    if len(inputs) > 1:
        logger.warning(
            "dataset %r has several image columns %s; using %r (name another with "
            "--image_column_name).", name, inputs, image,
        )  # fmt: skip
    classes = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    label = classes[0] if len(classes) == 1 else ("labels" if "labels" in feats else "label")
    masks = [c for c in mask_like if c != image]
    boxes = [c for c, f in feats.items() if c != image and _says(c, BOX_WORDS) and _is_box(f)]
    mask = _one(name, "mask", masks, "an image column named like a mask")
    box = _one(name, "box", boxes, "4 numbers or named fields, named like a box")
    splits = list(dd)
    train = "train" if "train" in dd else splits[0]
    evals = [s for s in EVAL_SPLIT_NAMES if s in dd and s != train]
    return DatasetSpec(
        name=name,
        hub_id=hub_id,
        image_column=image,
        label_column=label,
        mask_column=mask,
        box_column=box,
        train_split=train,
        eval_split=evals[0] if evals else None,
    )


def name_columns(spec: DatasetSpec, **named: Any) -> DatasetSpec:
    """Apply the columns and annotation options the user named (None: keep the spec's).

    Naming a mask column drops a found box and the other way round, so the object is the one
    asked for.
    """
    given = {k: v for k, v in named.items() if v is not None}
    if "mask_column" in given and "box_column" not in given:
        given["box_column"] = None
    if "box_column" in given and "mask_column" not in given:
        given["mask_column"] = None
    if "mask_foreground" in given:
        given["mask_foreground"] = tuple(given["mask_foreground"])
    return dataclasses.replace(spec, **given)


def check_columns(
    ds: Any,
    spec: DatasetSpec,
    split: str,
    *,
    need_label: bool = True,
    named: tuple[str, ...] = (),
) -> DatasetSpec:
    """Raise for a missing image, label or named object column; drop a declared absent one.

    Args:
        ds: one split.
        spec: the columns to look for.
        split: the split's name, for messages.
        need_label: whether a label column is required.
        named: spec fields the user named (``"mask_column"``, ``"box_column"``): missing ones
            are an error, not a warning.
    """
    cols = list(ds.column_names)
    roles = ["image_column"] + (["label_column"] if need_label else [])
    roles += [r for r in ("mask_column", "box_column") if r in named and getattr(spec, r)]
    for role in roles:
        col = getattr(spec, role)
        if col not in cols:
            what = role.replace("_column", "")
            raise DataError(
                f"dataset {spec.name!r} (split {split!r}) has no {what} column {col!r}; its "
                f"columns are {cols}.{close_matches(col, cols)} Name the right one with "
                f"{_FLAGS[role]} (load_splits({role}=...))."
            )
    for role in ("box_column", "mask_column"):
        col = getattr(spec, role)
        if col is not None and col not in cols:
            logger.warning(
                "dataset %r (split %r) has no %s %r (columns: %s); Content Heatmap will not be "
                "computed from it.", spec.name, split, role, col, cols,
            )  # fmt: skip
            spec = dataclasses.replace(spec, **{role: None})
    return spec


def settle_object(ds: Any, spec: DatasetSpec) -> DatasetSpec:
    """Decide the mask rule once for the dataset and check the boxes, on a sample of rows.

    Returns:
        ``spec`` with ``mask_threshold`` set when neither it nor ``mask_foreground`` was.

    Raises:
        DataError: masks whose background value is unknown, or boxes that contradict the
            box format.
    """
    import datasets

    if spec.mask_column is not None:
        rule = spec.mask_rule
        if rule is None:
            column = ds.select(range(min(len(ds), _SAMPLE_MASKS)))
            if isinstance(column.features[spec.mask_column], datasets.Image):
                column = column.cast_column(spec.mask_column, datasets.Image(decode=False))
            rule = infer_mask_rule(_masks(column[spec.mask_column]), spec.mask_column)
            spec = dataclasses.replace(spec, mask_threshold=rule.threshold)
        logger.info(
            "dataset %r: object masks from column %r, %s (set with --mask_foreground_values "
            "or --mask_threshold).", spec.name, spec.mask_column, rule.describe(),
        )  # fmt: skip
    elif spec.box_column is not None:
        sample = ds.select(range(min(len(ds), _SAMPLE_BOXES)))[spec.box_column]
        check_boxes(sample, spec.box_column, spec.box_format)
        logger.info(
            "dataset %r: object boxes from column %r, box_format %r (set with --box_format).",
            spec.name, spec.box_column, spec.box_format,
        )  # fmt: skip
    return spec


def _masks(values: list[Any]):
    """Decoded masks of a sample; unreadable ones are left to the dataset's own row errors."""
    import datasets

    decoder = datasets.Image()
    for value in values:
        try:
            if isinstance(value, list):
                yield array_to_image(value)
            elif value is not None:
                yield decoder.decode_example(value)
        except (OSError, SyntaxError, ValueError, TypeError):
            continue


def _says(column: str, words: tuple[str, ...]) -> bool:
    lowered = column.lower()
    return any(w in lowered for w in words)


def _is_number(feature: Any) -> bool:
    import datasets

    dtype = getattr(feature, "dtype", "")
    return isinstance(feature, datasets.Value) and dtype.startswith(("int", "uint", "float"))


def _is_box(feature: Any) -> bool:
    """4 numbers, a list of them, or a struct of named box fields (of numbers or lists)."""
    import datasets

    if isinstance(feature, dict):
        keys = {str(k).lower() for k in feature}
        return any(set(names) <= keys for names in BOX_FIELD_NAMES)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        inner = feature.feature
        if _is_number(inner):
            return getattr(feature, "length", -1) in (4, -1)
        return _is_box(inner)
    return False


def _one(name: str, what: str, found: list[str], how: str) -> str | None:
    if len(found) == 1:
        logger.info("dataset %r: found the %s column %r (%s).", name, what, found[0], how)
        return found[0]
    if found:
        logger.warning(
            "dataset %r: several columns could be the %s (%s); none is used. Name one with "
            "--%s_column_name.", name, what, found, what,
        )  # fmt: skip
    return None
