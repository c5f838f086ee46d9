"""cgc_hf: Contrastive Grad-CAM Consistency fine-tuning for timm and transformers classifiers."""

from .arguments import HubArguments, ModelArguments
from .augment import CropFlip, align_heatmaps, sample_crop_flip, warp
from .cam import combine, linear_head_cam
from .card import model_card
from .classifiers import load_classifier
from .cli import ArgumentGroup, CGCArgumentParser
from .comparison import (
    EvaluationArguments,
    column_names,
    compare,
    folder_name,
    format_table,
    write_results,
)
from .config import METHOD_FIELDS, CGCConfig, CGCTrainingArguments
from .data import (
    DATASETS,
    LOAD_FIELDS,
    CGCDataset,
    DataArguments,
    DatasetSpec,
    Splits,
    TrainingData,
    box_to_mask,
    build_datasets,
    build_transform,
    collate,
    load_split,
    load_splits,
    save_split,
    split_labeled,
    to_rgb,
)
from .errors import (
    CGCError,
    CGCMemoryError,
    CGCTypeError,
    CGCValueError,
    CheckpointError,
    DataError,
    TargetLayerError,
)
from .evaluation import (
    METRICS,
    Evaluation,
    Metric,
    evaluate,
    evaluate_batch,
    paired_difference,
    summarize,
)
from .hub import CGCHubMixin
from .inference import Explanation, explain_images
from .loss import CGCLoss
from .metrics import (
    consistency,
    content_heatmap,
    heatmap_to_image_size,
    insertion_deletion,
    pointing_game,
    zero_heatmaps,
)
from .modeling import CGCModel
from .synthetic import make_synthetic
from .target_layer import TargetLayer
from .targets import resolve_target
from .training import CGCTrainer, latest_checkpoint, loader_options, set_seed
from .visualize import (
    comparison_figures,
    denormalize,
    explanation_figure,
    heatmap_grid,
    overlay,
)

__version__ = "0.1.0"

__all__ = [
    "ArgumentGroup",
    "CGCArgumentParser",
    "CGCConfig",
    "CGCDataset",
    "CGCError",
    "CGCHubMixin",
    "CGCLoss",
    "CGCMemoryError",
    "CGCModel",
    "CGCTrainer",
    "CGCTrainingArguments",
    "CGCTypeError",
    "CGCValueError",
    "CheckpointError",
    "CropFlip",
    "DATASETS",
    "DataArguments",
    "DataError",
    "DatasetSpec",
    "Evaluation",
    "EvaluationArguments",
    "Explanation",
    "HubArguments",
    "LOAD_FIELDS",
    "METHOD_FIELDS",
    "METRICS",
    "Metric",
    "ModelArguments",
    "Splits",
    "TargetLayer",
    "TargetLayerError",
    "TrainingData",
    "align_heatmaps",
    "box_to_mask",
    "build_datasets",
    "build_transform",
    "collate",
    "column_names",
    "combine",
    "compare",
    "comparison_figures",
    "consistency",
    "content_heatmap",
    "denormalize",
    "evaluate",
    "evaluate_batch",
    "explain_images",
    "explanation_figure",
    "folder_name",
    "format_table",
    "heatmap_grid",
    "heatmap_to_image_size",
    "insertion_deletion",
    "latest_checkpoint",
    "linear_head_cam",
    "load_classifier",
    "loader_options",
    "load_split",
    "load_splits",
    "make_synthetic",
    "model_card",
    "overlay",
    "paired_difference",
    "pointing_game",
    "resolve_target",
    "sample_crop_flip",
    "save_split",
    "set_seed",
    "split_labeled",
    "summarize",
    "to_rgb",
    "warp",
    "write_results",
    "zero_heatmaps",
]
