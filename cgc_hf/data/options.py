"""The data options of a run, as one dataclass: the recipes' data flags derive from its fields.

Example:
    >>> data_args = DataArguments(dataset_name="pets_dir", mask_dir="pets/trimaps",
    ...                           mask_foreground_values=(1, 3), labels_per_class=10)
    >>> splits = data_args.load_splits(seed=0)
    >>> model = CGCModel.from_backbone("resnet18", num_labels=splits.num_labels)
    >>> data = data_args.build_datasets(splits, model.config.data_config, seed=0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..coerce import coerce_fields
from ..config import DEFAULT_CROP_SCALE, option
from ..errors import DataError
from .annotations import BOX_FORMATS
from .build import REST, TrainingData, build_datasets
from .dataset import BAD_IMAGE_POLICIES
from .loading import Splits, load_image_dirs, load_splits

DEFAULT_DATASET = "synthetic"  # generated offline: runs anywhere, with masks and boxes


@dataclass
class DataArguments:
    """Where the images come from, which columns hold what, and how labels are limited.

    Field metadata: ``help`` (the flag's help), ``aliases`` (more flag names), ``choices``.
    """

    dataset_name: str = option(
        DEFAULT_DATASET,
        "A named dataset (synthetic, cub, cub_masks, cars, aircraft, flowers102, "
        "dogs, pets), a Hub dataset id, an image folder or a save_to_disk directory.",
        aliases=("--dataset",),
    )
    dataset_config_name: str | None = option(None, "Configuration name of a Hub dataset.")
    train_dir: str | None = option(
        None,
        "A folder of training images (class_name/image.jpg), instead of "
        "--dataset_name, as in transformers' image-classification example.",
    )
    validation_dir: str | None = option(
        None, "With --train_dir: a folder of evaluation images, same layout."
    )
    train_val_split: float | None = option(
        None,
        "Share of each class held out for evaluation when the data has no eval split; unset: 0.1.",
    )
    max_train_samples: int | None = option(
        None, "Train on a seeded random subset of this many rows (quick runs)."
    )
    max_eval_samples: int | None = option(
        None, "Evaluate on a seeded random subset of this many rows."
    )
    dataset_source: str | None = option(
        None, "For a named dataset: a local save_to_disk copy to read instead."
    )
    image_column_name: str | None = option(
        None, "Image column; unset: the dataset's, or the one found."
    )
    label_column_name: str | None = option(
        None, "Label column; unset: the dataset's, or the one found."
    )
    mask_column_name: str | None = option(
        None,
        "Column of object masks, for Content Heatmap and the pointing game; unset: "
        "the dataset's, or an image column named like a mask.",
    )
    box_column_name: str | None = option(
        None,
        "Column of object boxes; unset: the dataset's, or a column of 4 numbers or "
        "named fields named like a box.",
    )
    box_format: str | None = option(
        None,
        "Box numbers: xyxy or xywh in pixels, xyxy_norm or xywh_norm as fractions "
        "of the image size, yxyx_norm (TFDS); structs of named fields are read by name; "
        "unset: the dataset's, else xyxy.",
        choices=BOX_FORMATS,
    )
    mask_foreground_values: tuple[int, ...] | None = option(
        None,
        "Mask values that are the object, e.g. 1 3 for a trimap; unset: binary and "
        "label-index masks where nonzero, soft 0-255 masks above 127 (logged).",
    )
    mask_threshold: float | None = option(
        None,
        "Object where the mask is above this share of its full scale, e.g. 0.5 "
        "(> 127 of 255); 0 means nonzero.",
    )
    mask_dir: str | None = option(
        None,
        "Folder of masks named like the images (cat_1.jpg -> cat_1.png), flat or "
        "with the image folder's subfolders.",
    )
    eval_split: str | None = option(
        None,
        "Split to evaluate on; unset: the dataset's, or a held-out slice.",
        aliases=("--split",),
    )
    synthetic_kwargs: dict[str, Any] | None = option(
        None, "JSON options of the generated dataset, e.g. '{\"train_size\": 400}'."
    )
    remap_labels: bool = option(
        False,
        "Number sparse integer labels 0..K-1 (e.g. 0, 5, 99 -> 0, 1, 2); the class "
        "names keep the values.",
    )
    on_bad_image: str = option(
        "raise",
        "Unreadable image: stop with an error, or skip it and count it.",
        choices=BAD_IMAGE_POLICIES,
    )
    labels_per_class: int | None = option(
        None, "Keep exactly K labels per class; the rest become unlabeled."
    )
    label_fraction: float | None = option(
        None, "Keep this share of each class's labels; the rest become unlabeled."
    )
    unlabeled_dataset: str = option(
        REST,
        "Unlabeled images (CGC only): 'rest', the training rows that "
        "--labels_per_class / --label_fraction leave without a label; 'none', no unlabeled "
        "images (fully supervised); or a dataset to take them from (a flat image folder "
        "works).",
        aliases=("--unlabeled",),
    )
    train_crop_scale: tuple[float, float] = option(
        DEFAULT_CROP_SCALE, "Area range of the training random resized crop."
    )

    def __post_init__(self) -> None:
        coerce_fields(self)  # YAML and Python values read by the field types, as flags are
        if self.box_format is not None and self.box_format not in BOX_FORMATS:
            raise DataError(
                f"box_format must be one of {', '.join(BOX_FORMATS)}; got {self.box_format!r}."
            )
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}; got {self.on_bad_image!r}."
            )
        if self.mask_dir is not None and self.mask_column_name is not None:
            raise DataError(
                f"mask_dir ({self.mask_dir!r}) and mask_column_name ({self.mask_column_name!r}) "
                "both name the masks; give one."
            )
        if self.mask_foreground_values is not None:
            self.mask_foreground_values = tuple(self.mask_foreground_values)
        t = self.mask_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t < 1):
            raise DataError(f"mask_threshold must be a number in [0, 1), e.g. 0.5; got {t!r}.")
        k = self.labels_per_class
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise DataError(f"labels_per_class must be an integer >= 1; got {k!r}.")
        p = self.label_fraction
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise DataError(f"label_fraction must be in (0, 1]; got {p!r}.")
        if k is not None and p is not None:
            raise DataError(f"give labels_per_class ({k}) or label_fraction ({p}), not both.")
        self.train_crop_scale = tuple(float(v) for v in self.train_crop_scale)
        if self.validation_dir is not None and self.train_dir is None:
            raise DataError(
                f"validation_dir ({self.validation_dir!r}) needs train_dir, the training images."
            )
        if self.train_dir is not None and self.dataset_name != DEFAULT_DATASET:
            raise DataError(
                f"give dataset_name ({self.dataset_name!r}) or train_dir ({self.train_dir!r}), "
                "not both."
            )
        v = self.train_val_split
        if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
            raise DataError(f"train_val_split must be in (0, 1), e.g. 0.15; got {v!r}.")

    def load_splits(
        self, seed: int = 0, cache_dir: str | None = None, min_classes: int = 2
    ) -> Splits:
        """:func:`load_splits` with these options.

        Args:
            seed: seed of generated data, a held-out slice and the sample subsets.
            cache_dir: where ``datasets`` caches downloads (``ModelArguments.cache_dir``).
            min_classes: fewest classes accepted; 1 for an evaluation that ignores labels.
        """
        dataset: Any = self.dataset_name
        if self.train_dir is not None:
            dataset = load_image_dirs(self.train_dir, self.validation_dir, cache_dir)
        splits = load_splits(
            dataset,
            source=self.dataset_source,
            image_column=self.image_column_name,
            label_column=self.label_column_name,
            mask_column=self.mask_column_name,
            box_column=self.box_column_name,
            box_format=self.box_format,
            mask_foreground=self.mask_foreground_values,
            mask_threshold=self.mask_threshold,
            mask_dir=self.mask_dir,
            eval_split=self.eval_split,
            seed=seed,
            synthetic_kwargs=self.synthetic_kwargs,
            remap_labels=self.remap_labels,
            dataset_config=self.dataset_config_name,
            cache_dir=cache_dir,
            max_train_samples=self.max_train_samples,
            max_eval_samples=self.max_eval_samples,
            min_classes=min_classes,
            **({} if self.train_val_split is None else {"eval_fraction": self.train_val_split}),
        )
        if self.train_dir is not None:
            splits.spec = dataclasses.replace(splits.spec, name=self.train_dir)
        return splits

    def build_datasets(
        self, splits: Splits, data_config: dict[str, Any], seed: int = 0
    ) -> TrainingData:
        """:func:`build_datasets` with these options."""
        return build_datasets(
            splits,
            data_config,
            labels_per_class=self.labels_per_class,
            label_fraction=self.label_fraction,
            unlabeled=self.unlabeled_dataset,
            seed=seed,
            crop_scale=self.train_crop_scale,
            on_bad_image=self.on_bad_image,
            image_column=self.image_column_name,
        )


LOAD_FIELDS = (
    "dataset_name",
    "dataset_config_name",
    "train_dir",
    "validation_dir",
    "train_val_split",
    "dataset_source",
    "image_column_name",
    "label_column_name",
    "mask_column_name",
    "box_column_name",
    "box_format",
    "mask_foreground_values",
    "mask_threshold",
    "mask_dir",
    "eval_split",
    "synthetic_kwargs",
    "remap_labels",
)
"""The fields that say how a dataset is read (what an evaluation needs as well as training)."""
