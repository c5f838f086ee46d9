"""Datasets for CGC fine-tuning: named Hub datasets, image folders, saved datasets, label-limited
splits, transforms taken from the model's own data config, and a collate function.

One module per step: :mod:`.registry` (named datasets and their columns), :mod:`.loading`
(any source to checked splits), :mod:`.columns` (finding and checking columns),
:mod:`.labels` (a ``ClassLabel`` a head can be sized to), :mod:`.mask_folder` (masks matched
by file name), :mod:`.splits` (labeled / unlabeled choice), :mod:`.images` (image modes and
pixel arrays), :mod:`.annotations` (masks and boxes to object masks), :mod:`.transforms`,
:mod:`.dataset` (the torch dataset and collate), :mod:`.build` (the three datasets of a run)
and :mod:`.options` (the data options as a dataclass).

Example:
    >>> splits = load_splits("synthetic", synthetic_kwargs={"train_size": 80, "eval_size": 20})
    >>> labeled, unlabeled = split_labeled(splits.train, labels_per_class=5, seed=0)
    >>> tf = build_transform(model.config.data_config, train=True)
    >>> ds = CGCDataset(splits.train.select(labeled), tf, splits.spec)
    >>> batch = collate([ds[0], ds[1]])  # pixel_values (2, 3, H, W), labels (2,), mask (2, H, W)
"""

from ..config import IGNORE_INDEX
from ..errors import DataError
from .annotations import BOX_FORMATS, MaskRule, box_to_mask
from .build import TrainingData, build_datasets
from .dataset import BAD_IMAGE_POLICIES, CGCDataset, collate
from .images import array_to_image, to_rgb
from .loading import Splits, load_splits, load_unlabeled
from .options import LOAD_FIELDS, DataArguments
from .registry import DATASETS, DatasetSpec
from .splits import load_split, save_split, split_labeled
from .transforms import build_transform

__all__ = [
    "BAD_IMAGE_POLICIES",
    "BOX_FORMATS",
    "CGCDataset",
    "DATASETS",
    "DataError",
    "DataArguments",
    "DatasetSpec",
    "IGNORE_INDEX",
    "LOAD_FIELDS",
    "MaskRule",
    "Splits",
    "TrainingData",
    "array_to_image",
    "box_to_mask",
    "build_datasets",
    "build_transform",
    "collate",
    "load_split",
    "load_splits",
    "load_unlabeled",
    "save_split",
    "split_labeled",
    "to_rgb",
]
