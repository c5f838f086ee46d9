"""Loading: any accepted form of a dataset becomes checked train and eval splits.

A registry name, a Hub id, an image folder, a ``save_to_disk`` directory or a ``datasets``
object is resolved to a ``DatasetDict`` and a :class:`DatasetSpec`; the columns are checked and
the labels made a ``ClassLabel`` with the same names in both splits.

Example:
    >>> splits = load_splits("synthetic", synthetic_kwargs={"train_size": 80, "eval_size": 20})
    >>> splits.num_labels, splits.spec.mask_column
    (4, 'mask')
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, close_matches, first_line
from ..synthetic import make_synthetic
from .columns import check_columns, find_columns, name_columns, settle_object
from .labels import cast_labels
from .mask_folder import attach_mask_folder
from .registry import DATASETS, DatasetSpec
from .splits import holdout, label_array

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """The loaded train and eval splits with the resolved columns and class names."""

    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    spec: DatasetSpec
    num_labels: int
    id2label: dict[int, str]


# ---------------------------------------------------------------------------------- loading
def load_splits(
    dataset: Any = "synthetic",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    mask_column: str | None = None,
    box_column: str | None = None,
    box_format: str | None = None,
    mask_foreground: tuple[int, ...] | None = None,
    mask_threshold: float | None = None,
    mask_dir: str | os.PathLike | None = None,
    eval_split: str | None = None,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    source: Any = None,
    eval_fraction: float = 0.1,
    remap_labels: bool = False,
    dataset_config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    min_classes: int = 2,
) -> Splits:
    """Load a dataset's train and eval splits, check its columns, and make labels ``ClassLabel``.

    Args:
        dataset: a :data:`DATASETS` name, a Hub dataset id, a local image folder
            (``class_name/image.jpg``), a ``save_to_disk`` directory, or a ``datasets.Dataset`` /
            ``DatasetDict`` object.
        image_column: override of the image column (``--image_column_name``).
        label_column: override of the label column (``--label_column_name``).
        mask_column: column of object masks (``--mask_column_name``); default: the registry's,
            or an image column named like a mask (logged).
        box_column: column of object boxes (``--box_column_name``); default: the registry's, or
            a column of 4 numbers or named fields named like a box (logged).
        box_format: ``xyxy`` / ``xywh`` (pixels), ``xyxy_norm`` / ``xywh_norm`` (fractions of
            the image size) or ``yxyx_norm``; structs of named fields are read by name.
        mask_foreground: mask values that are the object (``--mask_foreground_values 1 3`` for
            a trimap); default: decided from a sample of masks (binary: nonzero; soft: above
            half of the full scale, > 127 of 255; label-index: nonzero), logged.
        mask_threshold: object where the mask is above this share of its full scale.
        mask_dir: a folder of masks with the images' file names (any image extension, the
            same subfolders or flat), for an image folder or a dataset whose images have paths.
        eval_split: split to evaluate on (default: the spec's; a missing one is replaced by a
            seeded, stratified ``eval_fraction`` of the training split).
        seed: seed of the synthetic data and of a held-out eval slice.
        synthetic_kwargs: keyword arguments of :func:`make_synthetic`.
        source: for a registry name, read its columns from this local copy (a ``save_to_disk``
            directory or a ``DatasetDict``) instead of the Hub, e.g. on a machine offline.
        eval_fraction: share of each class held out when there is no eval split.
        remap_labels: number sparse integer labels ``0..K-1`` (see :mod:`.labels`).
        dataset_config: configuration name of a Hub dataset (``--dataset_config_name``).
        cache_dir: where ``datasets`` keeps downloads and image-folder caches.
        max_train_samples: keep a seeded random subset of this many training rows (in their
            order), as transformers' example does for quick runs.
        max_eval_samples: the same for the eval rows (the same seed picks the same rows).
        min_classes: fewest classes accepted (a one-class dataset would train a constant
            model that scores 100%); 1 for an evaluation that ignores the labels.

    Returns:
        :class:`Splits`; ``spec`` names the columns actually used and the mask rule.

    Raises:
        DataError: the dataset cannot be found or downloaded, a split or column is missing,
            a label is missing or outside ``[0, num_labels)``, there are fewer than two
            classes, or masks / boxes do not fit their options.
    """
    hub_options = {"name": dataset_config, "cache_dir": cache_dir}
    hub_options = {k: v for k, v in hub_options.items() if v is not None}
    spec, dd = _resolve(dataset, source, seed, synthetic_kwargs or {}, hub_options)
    if mask_dir is not None:
        if mask_column is not None:
            raise DataError(
                f"mask_dir ({str(mask_dir)!r}) and mask_column ({mask_column!r}) both name the "
                "masks; give one."
            )
        root = source if source is not None else dataset
        dd, mask_column = attach_mask_folder(dd, mask_dir, image_column or spec.image_column, root)
    named = {"mask_column": mask_column, "box_column": box_column}
    spec = name_columns(
        spec,
        image_column=image_column,
        label_column=label_column,
        box_format=box_format,
        mask_foreground=mask_foreground,
        mask_threshold=mask_threshold,
        **named,
    )
    named_roles = tuple(k for k, v in named.items() if v is not None)
    splits = list(dd)
    if spec.train_split not in dd:
        raise DataError(
            f"dataset {spec.name!r} has no split {spec.train_split!r} to train on; it has {splits}."
        )
    wanted_eval = eval_split if eval_split is not None else spec.eval_split
    if eval_split is not None and eval_split not in dd:
        raise DataError(
            f"eval_split {eval_split!r} is not a split of dataset {spec.name!r}; it has "
            f"{splits}.{close_matches(eval_split, splits)}"
        )
    if wanted_eval is not None and wanted_eval not in dd:
        logger.warning(
            "dataset %r has no split %r (it has %s); holding out %.0f%% of %r for evaluation.",
            spec.name, wanted_eval, splits, 100 * eval_fraction, spec.train_split,
        )  # fmt: skip
        wanted_eval = None
    train = dd[spec.train_split]
    spec = check_columns(train, spec, spec.train_split, named=named_roles)
    if wanted_eval is not None:
        evald = dd[wanted_eval]
        check_columns(evald, spec, wanted_eval, named=named_roles)
    else:
        evald = None
    train, evald, names = cast_labels(
        train, evald, spec, remap_labels=remap_labels, min_classes=min_classes
    )
    spec = settle_object(train, spec)
    if evald is None:
        rest, held = holdout(label_array(train, spec.label_column), eval_fraction, seed)
        train, evald = train.select(rest), train.select(held)
    train = _subset(train, max_train_samples, seed, "max_train_samples")
    evald = _subset(evald, max_eval_samples, seed, "max_eval_samples")
    spec = dataclasses.replace(spec, eval_split=wanted_eval)
    id2label = dict(enumerate(names))
    logger.info(
        "dataset %r: %d train / %d eval rows, %d classes, object annotation: %s",
        spec.name, len(train), len(evald), len(names), spec.mask_column or spec.box_column,
    )  # fmt: skip
    return Splits(train=train, eval=evald, spec=spec, num_labels=len(names), id2label=id2label)


def load_unlabeled(
    dataset: Any,
    *,
    image_column: str | None = None,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    source: Any = None,
) -> tuple[Any, DatasetSpec]:
    """Load a pool of unlabeled images: the training split of ``dataset``, labels not needed.

    Accepts what :func:`load_splits` accepts, and also a flat folder of images (no class
    subfolders) or a dataset without a label column. Labels that exist are ignored, and so are
    boxes and masks (the CGC term needs neither); every row of the training split is used.

    Returns:
        ``(rows, spec)``: a ``datasets.Dataset`` and the :class:`DatasetSpec` naming its image
        column, for ``CGCDataset(rows, transform, spec, unlabeled=True)``.

    Raises:
        DataError: the dataset cannot be found, or has no image column.
    """
    spec, dd = _resolve(dataset, source, seed, synthetic_kwargs or {})
    spec = dataclasses.replace(
        spec, image_column=image_column or spec.image_column, box_column=None, mask_column=None
    )
    if spec.train_split not in dd:
        raise DataError(
            f"unlabeled dataset {spec.name!r} has no split {spec.train_split!r}; it has {list(dd)}."
        )
    rows = dd[spec.train_split]
    check_columns(rows, spec, spec.train_split, need_label=False)
    logger.info("unlabeled pool %r: %d images", spec.name, len(rows))
    return rows, spec


def load_image_dirs(
    train_dir: str | os.PathLike,
    validation_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Image folders (``class_name/image.jpg``) as one ``DatasetDict`` of train and validation.

    Both folders are read in one call, so their classes get the same names and numbers, as in
    transformers' image-classification example (``--train_dir`` / ``--validation_dir``).
    """
    import datasets

    files = {"train": train_dir, "validation": validation_dir}
    for split, folder in files.items():
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{split}_dir {str(folder)!r} is not a directory of images.")
    patterns = {s: str(Path(f) / "**") for s, f in files.items() if f is not None}
    try:
        return _as_dict(
            datasets.load_dataset("imagefolder", data_files=patterns, cache_dir=cache_dir)
        )
    except (OSError, ValueError) as err:
        raise DataError(
            f"train_dir / validation_dir {list(patterns.values())} are not readable image "
            f"folders (class_name/image.jpg): {first_line(err)}"
        ) from err


def _subset(ds: Any, count: int | None, seed: int, name: str) -> Any:
    """A seeded random ``count`` rows of ``ds``, kept in their order (all rows when None)."""
    if count is None:
        return ds
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise DataError(f"{name} must be an integer >= 1; got {count!r}.")
    if count >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.select(sorted(rng.permutation(len(ds))[:count].tolist()))


def _resolve(
    dataset: Any,
    source: Any,
    seed: int,
    synthetic_kwargs: dict[str, Any],
    hub_options: dict[str, Any] | None = None,
):
    """Return (spec, DatasetDict) for any accepted form of ``dataset``."""
    import datasets

    if isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        dd = _as_dict(dataset)
        return find_columns("<in-memory dataset>", None, dd), dd
    if not isinstance(dataset, (str, os.PathLike)):
        raise DataError(
            f"dataset must be a registry name, Hub id, directory or datasets object; got "
            f"{type(dataset).__name__}."
        )
    name = os.fspath(dataset)
    if name in DATASETS:
        spec = DATASETS[name]
        if source is not None:
            return spec, _load_local(source, hub_options)
        if name == "synthetic":
            kwargs = {"seed": seed, **synthetic_kwargs}
            known = inspect.signature(make_synthetic).parameters
            unknown = sorted(set(kwargs) - set(known))
            if unknown:
                raise DataError(
                    f"synthetic_kwargs has unknown keys {unknown}; allowed: "
                    f"{sorted(k for k in known if k != 'seed')}."
                )
            return spec, make_synthetic(**kwargs)
        return spec, _load_hub(spec.hub_id, name, hub_options)
    if os.path.isdir(name):
        dd = _load_local(name, hub_options)
        return find_columns(name, None, dd), dd
    if os.path.exists(name):
        raise DataError(
            f"dataset {name!r} is a file; pass a directory (an image folder or a save_to_disk "
            "output), a registry name or a Hub id."
        )
    if "/" not in name:
        raise DataError(
            f"dataset {name!r} is not a registry name ({sorted(DATASETS)}), an existing "
            f"directory, or a Hub id of the form 'owner/name'.{close_matches(name, DATASETS)}"
        )
    dd = _load_hub(name, name, hub_options)
    return find_columns(name, name, dd), dd


def _as_dict(obj: Any):
    import datasets

    if isinstance(obj, datasets.Dataset):
        return datasets.DatasetDict({"train": obj})
    return obj


def _load_local(path: Any, hub_options: dict[str, Any] | None = None):
    """A save_to_disk directory, an image folder, or an in-memory datasets object."""
    import datasets

    if isinstance(path, (datasets.Dataset, datasets.DatasetDict)):
        return _as_dict(path)
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"source {str(path)!r} is not a directory.")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _as_dict(datasets.load_from_disk(str(path)))
    try:
        cache = {k: v for k, v in (hub_options or {}).items() if k == "cache_dir"}
        dd = datasets.load_dataset("imagefolder", data_dir=str(path), **cache)
    except (OSError, ValueError) as err:
        raise DataError(
            f"directory {str(path)!r} is neither a save_to_disk output nor a readable image folder "
            f"(class_name/image.jpg): {first_line(err)}"
        ) from err
    return _as_dict(dd)


def _load_hub(hub_id: str | None, name: str, hub_options: dict[str, Any] | None = None):
    import datasets

    try:
        return _as_dict(datasets.load_dataset(hub_id, **(hub_options or {})))
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError are OSErrors
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataError(
            f"dataset {name!r} (hub id {hub_id!r}) could not be downloaded{offline}: "
            f"{first_line(err)}. Download it where the Hub is reachable and pass the "
            "save_to_disk copy (load_splits(name, source=DIR)), or use dataset='synthetic'."
        ) from err
