"""The three datasets of a CGC run: labeled, unlabeled and eval, from loaded splits.

What a fine-tuning script would otherwise assemble by hand: the seeded labeled / unlabeled
choice, the transforms from the model's own data config (random resized crop for training,
resize and center crop for evaluation) and an optional separate pool of unlabeled images.

Example:
    >>> splits = load_splits("synthetic")
    >>> model = CGCModel.from_backbone("resnet18", num_labels=splits.num_labels)
    >>> data = build_datasets(splits, model.config.data_config, labels_per_class=10, seed=0)
    >>> data.labeled, data.unlabeled, data.eval  # CGCDatasets; unlabeled rows feed CGC only
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE
from .dataset import CGCDataset
from .loading import Splits, load_unlabeled
from .splits import save_split, split_labeled
from .transforms import build_transform

logger = logging.getLogger(__name__)

REST = "rest"  # ``unlabeled="rest"`` (or None): the rows a label budget leaves over
NONE = "none"  # ``unlabeled="none"``: the labeled rows only (fully supervised)


@dataclass
class TrainingData:
    """The datasets of one run and the labeled / unlabeled choice that produced them.

    Attributes:
        labeled: training rows with their labels (cross-entropy and CGC).
        unlabeled: rows without labels (CGC only), or None.
        eval: the evaluation split, deterministic transform.
        labeled_idx: rows of ``Splits.train`` that kept their label.
        unlabeled_idx: rows of ``Splits.train`` whose label was dropped (recorded even when a
            separate unlabeled dataset takes their place as the unlabeled pool).
        num_train_rows: rows in ``Splits.train``.
    """

    labeled: CGCDataset
    unlabeled: CGCDataset | None
    eval: CGCDataset
    labeled_idx: list[int]
    unlabeled_idx: list[int]
    num_train_rows: int

    @property
    def label_setting(self) -> str:
        """How many labels training used, in words (for the model card)."""
        if self.unlabeled_idx:
            return f"{len(self.labeled_idx)} of {self.num_train_rows} training labels"
        return "all training labels"

    @property
    def bad_images(self) -> int:
        """Unreadable images skipped so far across the three datasets (``on_bad_image='skip'``)."""
        parts = (self.labeled, self.unlabeled, self.eval)
        return sum(ds.bad_images for ds in parts if ds is not None)

    def save_split(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        """Write the labeled / unlabeled choice as JSON (:func:`save_split`)."""
        save_split(path, self.labeled_idx, self.unlabeled_idx, meta)


def build_datasets(
    splits: Splits,
    data_config: dict[str, Any],
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    unlabeled: Any = None,
    seed: int = 0,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
    on_bad_image: str = "raise",
    image_column: str | None = None,
) -> TrainingData:
    """Build the labeled, unlabeled and eval datasets of a run.

    Args:
        splits: from :func:`load_splits`.
        data_config: the model's data config (``CGCModel.config.data_config``): input size,
            mean, std, interpolation, crop_pct.
        labels_per_class: keep exactly K labels per class; the other rows become unlabeled.
        label_fraction: keep this share of each class's labels; the other rows become unlabeled.
        unlabeled: ``"rest"`` or None: the rows left without a label by ``labels_per_class``
            / ``label_fraction`` (none when neither is given); ``"none"``: no unlabeled data at
            all (the paper's fully-supervised setting); anything else: a dataset to take the
            unlabeled images from (a registry name, Hub id, directory or ``datasets`` object).
        seed: seed of the labeled choice and of a generated unlabeled dataset.
        crop_scale: area range of the training random resized crop.
        crop_ratio: aspect-ratio range of the training random resized crop.
        on_bad_image: ``"raise"`` or ``"skip"`` an unreadable image (see :class:`CGCDataset`).
        image_column: image column of a separate unlabeled dataset (default: detected).

    Returns:
        :class:`TrainingData`.

    Raises:
        DataError: a bad split option, or an unlabeled dataset that cannot be loaded.
    """
    labeled_idx = list(range(len(splits.train)))
    unlabeled_idx: list[int] = []
    if labels_per_class is not None or label_fraction is not None:
        labeled_idx, unlabeled_idx = split_labeled(
            splits.train,
            labels_per_class=labels_per_class,
            label_fraction=label_fraction,
            seed=seed,
            label_column=splits.spec.label_column,
        )
    source = None if isinstance(unlabeled, str) and unlabeled == REST else unlabeled
    if isinstance(unlabeled, str) and unlabeled == NONE:
        unlabeled_idx, source = [], None
    # The model's own data config: mean, std and size are never hard-coded.
    train_tf = build_transform(data_config, train=True, scale=crop_scale, ratio=crop_ratio)
    eval_tf = build_transform(data_config, train=False)
    spec = splits.spec
    labeled = CGCDataset(
        splits.train.select(labeled_idx), train_tf, spec, on_bad_image=on_bad_image
    )
    evald = CGCDataset(splits.eval, eval_tf, spec, on_bad_image=on_bad_image)
    pool = None
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) == spec.name:
        # The labeled dataset itself: its training rows only, so that a held-out eval slice
        # never reaches training, not even without its labels.
        pool = CGCDataset(splits.train, train_tf, spec, unlabeled=True, on_bad_image=on_bad_image)
    elif source is not None:
        rows, other = load_unlabeled(source, image_column=image_column, seed=seed)
        pool = CGCDataset(rows, train_tf, other, unlabeled=True, on_bad_image=on_bad_image)
    elif unlabeled_idx:
        pool = CGCDataset(
            splits.train.select(unlabeled_idx),
            train_tf,
            spec,
            unlabeled=True,
            on_bad_image=on_bad_image,
        )
    logger.info(
        "training data: %d labeled, %d unlabeled, %d eval rows",
        len(labeled), len(pool) if pool is not None else 0, len(evald),
    )  # fmt: skip
    return TrainingData(
        labeled=labeled,
        unlabeled=pool,
        eval=evald,
        labeled_idx=labeled_idx,
        unlabeled_idx=unlabeled_idx,
        num_train_rows=len(splits.train),
    )
