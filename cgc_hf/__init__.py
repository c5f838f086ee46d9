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
from .metrics import (
    consistency,
    content_heatmap,
    evaluate_batch,
    heatmap_to_image_size,
    insertion_deletion,
    pointing_game,
    zero_heatmaps,
)
from .modeling import CGCModel
from .targets import TargetLayer, resolve_target
from .visualize import denormalize, explanation_figure, heatmap_grid, overlay

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
    "consistency",
    "content_heatmap",
    "denormalize",
    "evaluate_batch",
    "explanation_figure",
    "heatmap_grid",
    "heatmap_to_image_size",
    "insertion_deletion",
    "linear_head_cam",
    "model_card",
    "overlay",
    "pointing_game",
    "resolve_target",
    "sample_crop_flip",
    "warp",
    "zero_heatmaps",
]
