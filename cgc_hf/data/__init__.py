"""Datasets for CGC fine-tuning: named Hub datasets, image folders, saved datasets, label-limited
splits, transforms taken from the model's own data config, and a collate function.

One module per step: :mod:`.registry` (named datasets and their columns), :mod:`.loading`
(any source to checked splits), :mod:`.splits` (labeled / unlabeled choice), :mod:`.images`
(image modes, masks, boxes), :mod:`.transforms`, :mod:`.dataset` (the torch dataset and collate)
and :mod:`.build` (the three datasets of a run).

Example:
    >>> splits = load_splits("synthetic", synthetic_kwargs={"train_size": 80, "eval_size": 20})
    >>> labeled, unlabeled = split_labeled(splits.train, labels_per_class=5, seed=0)
    >>> tf = build_transform(model.config.data_config, train=True)
    >>> ds = CGCDataset(splits.train.select(labeled), tf, splits.spec)
    >>> batch = collate([ds[0], ds[1]])  # pixel_values (2, 3, H, W), labels (2,), mask (2, H, W)
"""

from ..config import IGNORE_INDEX
from ..errors import DataError
from .build import TrainingData, build_datasets
from .dataset import BAD_IMAGE_POLICIES, CGCDataset, collate
from .images import box_to_mask, to_rgb
from .loading import Splits, load_splits, load_unlabeled
from .registry import BOX_FORMATS, DATASETS, DatasetSpec
from .splits import load_split, save_split, split_labeled
from .transforms import build_transform

__all__ = [
    "BAD_IMAGE_POLICIES",
    "BOX_FORMATS",
    "CGCDataset",
    "DATASETS",
    "DataError",
    "DatasetSpec",
    "IGNORE_INDEX",
    "Splits",
    "TrainingData",
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
