"""cgc_hf: Contrastive Grad-CAM Consistency fine-tuning for timm and transformers classifiers."""

from .augment import CropFlip, sample_crop_flip, warp
from .cam import combine, linear_head_cam
from .card import model_card
from .config import CGCConfig
from .errors import (
    CGCError,
    CGCTypeError,
    CGCValueError,
    CheckpointError,
    DataError,
    TargetLayerError,
)
from .hub import CGCHubMixin
from .loss import CGCLoss
from .modeling import CGCModel
from .targets import TargetLayer, resolve_target

__version__ = "0.1.0"

__all__ = [
    "CGCConfig",
    "CGCError",
    "CGCHubMixin",
    "CGCLoss",
    "CGCModel",
    "CGCTypeError",
    "CGCValueError",
    "CheckpointError",
    "CropFlip",
    "DataError",
    "TargetLayer",
    "TargetLayerError",
    "combine",
    "linear_head_cam",
    "model_card",
    "resolve_target",
    "sample_crop_flip",
    "warp",
]
