"""Configuration: the CGC method and wrapped classifier, and the options of a training run.

Each dataclass is the single source of truth for its options: it coerces every value to the
field's declared type (:mod:`cgc_hf.coerce`, so flags, YAML and Python agree), validates itself in
``__post_init__``, is saved as JSON next to every run, and :mod:`cgc_hf.cli` derives the
command-line flags from its fields and their ``help`` metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .backbones import ADAPTERS
from .coerce import coerce_fields
from .errors import CGCValueError

IGNORE_INDEX = -100
"""Label of an unlabeled row (the Hugging Face convention for ignored targets)."""
DEFAULT_CROP_SCALE = (0.08, 1.0)
"""Area range of a random resized crop, as fractions of the image (ImageNet practice, the paper)."""
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of a random resized crop."""


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its ``--help`` text (and ``aliases`` / ``choices`` for the CLI)."""
    return field(default=default, metadata={"help": help, **metadata})


CAM_METHODS = ("grad_x_act", "gradcam")
CAM_TARGETS = ("predicted", "label")
LIBRARIES = tuple(sorted(ADAPTERS))
"""The backbone libraries, one :class:`~cgc_hf.backbones.BackboneAdapter` each."""


@dataclass
class CGCConfig:
    """Options of Contrastive Grad-CAM Consistency and a description of the wrapped backbone.

    Defaults follow Pillai et al., "Consistent Explanations by Contrastive Learning", CVPR 2022
    (ImageNet setting: lambda 0.5, temperature 0.5, crop scale (0.08, 1), flip 0.5).

    Example:
        >>> cfg = CGCConfig(cgc_lambda=0.25, temperature=0.5)
        >>> cfg.to_dict()["cgc_lambda"]
        0.25
    """

    # --- method ---------------------------------------------------------------------------
    cgc_lambda: float = option(0.5, "Weight of the CGC term: loss = CE + lambda * L_CGC.")
    temperature: float = option(
        0.5, "InfoNCE temperature over heatmap cosine similarities.", aliases=["--cgc_temperature"]
    )
    cam_method: str = option(
        "grad_x_act",
        "Heatmap flavour: 'grad_x_act' (the paper's element-wise gradient x "
        "activation) or 'gradcam' (gradients averaged over space, classic Grad-CAM).",
    )
    cam_target: str = option(
        "predicted",
        "Class to explain during training: 'predicted' (argmax of the original "
        "view, works for unlabeled rows) or 'label' (ground truth where known).",
    )
    compare_size: int = option(
        56, "Side of the square grid on which heatmaps are compared in the loss."
    )
    crop_scale: tuple[float, float] = option(
        DEFAULT_CROP_SCALE, "Area range of the random resized crop, as fractions of the image."
    )
    crop_ratio: tuple[float, float] = option(
        DEFAULT_CROP_RATIO, "Aspect-ratio range of the random resized crop."
    )
    flip_prob: float = option(0.5, "Probability of a horizontal flip in the CGC view.")
    ce_on_augmented: bool = option(
        True, "Also apply cross-entropy to the augmented view of labeled rows."
    )
    separate_views: bool = option(
        False,
        "Run the original and the augmented view in two forwards (each view its own "
        "BatchNorm batch, as the paper's code does) instead of one forward over both.",
    )
    # --- model ----------------------------------------------------------------------------
    library: str | None = option(None, "Backbone library: 'timm' or 'transformers'.")
    architecture: str | None = option(
        None, "timm model name, or transformers model class name of the backbone."
    )
    backbone_config: dict[str, Any] | None = option(
        None, "Everything needed to rebuild the backbone without downloading it."
    )
    num_labels: int | None = option(None, "Number of classes.")
    id2label: dict[int, str] | None = option(None, "Class index -> class name.")
    target_layer: str | None = option(
        None, "Module name of the Grad-CAM layer; resolved automatically if unset."
    )
    target: dict[str, Any] | None = option(
        None, "Resolved target-layer description (set by CGCModel)."
    )
    data_config: dict[str, Any] | None = option(
        None, "Input size, mean, std, interpolation the backbone was trained with."
    )
    input_size: tuple[int, int] | None = option(
        None,
        "(height, width) of the images the model is trained and evaluated at; "
        "overrides the backbone's own input size in data_config (convolutional models take "
        "any size).",
    )
    base_model: str | None = option(
        None,
        "Hub id of the pretrained weights the backbone started from (None: random "
        "init, or not known for a model passed as an instance).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.input_size, int) and not isinstance(self.input_size, bool):
            self.input_size = (self.input_size, self.input_size)  # a side: square images
        coerce_fields(self)  # JSON gives lists, YAML gives strings for 1e-4
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        _check(
            self.cgc_lambda >= 0,
            "cgc_lambda",
            self.cgc_lambda,
            "a finite number >= 0 (0 trains with cross-entropy alone)",
        )
        _check(
            self.temperature > 0, "temperature", self.temperature, "a finite number > 0, e.g. 0.5"
        )
        _check(self.cam_method in CAM_METHODS, "cam_method", self.cam_method, CAM_METHODS)
        _check(self.cam_target in CAM_TARGETS, "cam_target", self.cam_target, CAM_TARGETS)
        _check(
            self.compare_size >= 2,
            "compare_size",
            self.compare_size,
            "an integer >= 2, e.g. 56",
        )
        _check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            self.crop_scale,
            "two numbers 0 < min <= max <= 1, e.g. (0.08, 1.0)",
        )
        _check(
            len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "crop_ratio",
            self.crop_ratio,
            "two numbers 0 < min <= max, e.g. (0.75, 1.333)",
        )
        _check(0 <= self.flip_prob <= 1, "flip_prob", self.flip_prob, "a probability in [0, 1]")
        _check(
            self.library is None or self.library in LIBRARIES, "library", self.library, LIBRARIES
        )
        _check(
            self.num_labels is None or self.num_labels >= 1,
            "num_labels",
            self.num_labels,
            "a positive integer",
        )
        _check(
            self.input_size is None or min(self.input_size) >= 1,
            "input_size",
            self.input_size,
            "two positive integers (height, width), e.g. (224, 224), or None",
        )
        self.data_config = self.with_input_size(self.data_config)

    def with_input_size(self, data_config: dict[str, Any] | None) -> dict[str, Any] | None:
        """``data_config`` with ``input_size`` set from :attr:`input_size` (when that is set)."""
        if data_config is None or self.input_size is None:
            return data_config
        channels = (data_config.get("input_size") or (3,))[0]
        return {**data_config, "input_size": [channels, *self.input_size]}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (tuples become lists, ``id2label`` keys become strings)."""
        d = dataclasses.asdict(self)
        d["crop_scale"], d["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
        if self.input_size is not None:
            d["input_size"] = list(self.input_size)
        if self.id2label is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CGCConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CGCValueError(
                f"CGCConfig got unknown keys {unknown}; allowed keys are {sorted(names)}. "
                "The file may come from a newer cgc_hf: upgrade it."
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = (
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "one_cycle",
)
"""transformers' ``get_scheduler`` names that need no extra arguments, and ``one_cycle``."""
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class CGCTrainingArguments:
    """Options of a :class:`~cgc_hf.CGCTrainer` run (names follow transformers' TrainingArguments).

    Example:
        >>> args = CGCTrainingArguments(output_dir="runs/cub", per_device_train_batch_size=32,
        ...                             learning_rate=1e-4, head_learning_rate=1e-3)
    """

    output_dir: str = option("cgc-output", "Where arguments, metrics, checkpoints go.")
    overwrite_output_dir: bool = option(
        False, "Replace a previous run in output_dir (otherwise it is refused)."
    )
    per_device_train_batch_size: int = option(
        16, "Labeled images per device and step (>= 2 for CGC: negatives)."
    )
    per_device_eval_batch_size: int = option(32, "Images per device and evaluation batch.")
    unlabeled_batch_size: int | None = option(
        None, "Unlabeled images per device and step (default: the train batch size)."
    )
    learning_rate: float = option(1e-4, "Peak learning rate of the backbone.")
    head_learning_rate: float | None = option(
        None, "Peak learning rate of the classifier head (default: learning_rate)."
    )
    weight_decay: float = option(
        0.01, "Weight decay (not applied to biases and normalisation weights)."
    )
    optim: str = option("adamw", "Optimizer: 'adamw' or 'sgd'.")
    momentum: float = option(0.9, "SGD momentum.")
    lr_scheduler_type: str = option(
        "cosine",
        "Learning-rate schedule after warmup: transformers' names (cosine, linear, "
        "constant, constant_with_warmup, cosine_with_restarts, polynomial, inverse_sqrt) or "
        "one_cycle (torch's OneCycleLR: warmup over warmup_steps / warmup_ratio, default "
        "30%, then cosine annealing). 'constant' with a warmup is constant_with_warmup.",
    )
    warmup_ratio: float = option(0.0, "Fraction of the optimizer steps used for linear warmup.")
    warmup_steps: int = option(
        0, "Warmup steps; overrides warmup_ratio when > 0.", aliases=["--num_warmup_steps"]
    )
    num_train_epochs: int = option(3, "Passes over the labeled data (unless max_train_steps).")
    max_train_steps: int | None = option(
        None, "Total optimizer steps; overrides num_train_epochs when set."
    )
    gradient_accumulation_steps: int = option(
        1,
        "Batches accumulated per optimizer step. The CGC term's InfoNCE negatives "
        "are the other images of each micro-batch, so accumulation is not the same as a "
        "larger batch for CGC (cross-entropy is).",
    )
    max_grad_norm: float | None = option(
        1.0, "Gradient clipping norm; None or 0 disables clipping."
    )
    mixed_precision: str | None = option(
        None,
        "'no', 'bf16' or 'fp16' (fp16 needs a GPU); default: what Accelerate is "
        "configured with (accelerate config, accelerate launch --mixed_precision, "
        "ACCELERATE_MIXED_PRECISION), else 'no'.",
    )
    seed: int = option(42, "Seed of weights-independent randomness.")
    checkpointing_steps: str | int | None = option(
        None, "Save the training state every N optimizer steps, or 'epoch'."
    )
    checkpoints_total_limit: int | None = option(
        None, "Keep at most this many checkpoints (oldest deleted)."
    )
    resume_from_checkpoint: str | None = option(
        None, "'latest' (newest complete checkpoint in output_dir) or a path."
    )
    allow_config_change: bool = option(
        False,
        "Resume even though options that change the result differ from the saved "
        "run's (args.json then records both); without it such a resume is refused.",
    )
    metric_for_best_model: str | None = option(
        None,
        "Metric that picks the best evaluation, e.g. 'accuracy' or "
        "'eval_content_heatmap' (default with load_best_model_at_end: accuracy).",
    )
    greater_is_better: bool | None = option(
        None, "Whether a larger metric is better (default: the metric's own)."
    )
    load_best_model_at_end: bool = option(
        False, "Keep the best evaluation's checkpoint and make its weights the final model."
    )
    report_to: str = option(
        "none", "Trackers: 'none', 'all', or a comma list such as 'tensorboard,wandb'."
    )
    logging_steps: int = option(10, "Log training loss every N optimizer steps.")
    eval_steps: int | None = option(None, "Evaluate every N optimizer steps (default: each epoch).")
    eval_insertion_steps: int = option(
        0, "Steps of the insertion / deletion AUC metric (0 skips it: slow)."
    )
    eval_explanation_images: int | None = option(
        None,
        "Measure the explanation metrics (consistency, Content Heatmap, pointing game, "
        "insertion / deletion) of each evaluation on the first N evaluation images only, the "
        "same images every time; accuracy still uses every image. They cost about three "
        "heatmap passes per image, as much as a training step's image at 224 px (README: "
        "Benchmarks > Evaluation cost). Default: every image. recipes/evaluate.py measures "
        "the whole split.",
    )
    cgc_warmup_steps: int = option(
        0,
        "Optimizer steps over which the CGC weight grows linearly from 0 to "
        "cgc_lambda (0: full weight from the start, as in the paper). Helps from random "
        "weights, whose first heatmaps carry no signal.",
    )
    max_nonfinite_steps: int = option(
        5, "Stop after this many optimizer steps in a row with a non-finite loss."
    )
    dataloader_num_workers: int | None = option(
        None,
        "Worker processes per data loader (labeled, unlabeled, eval), kept for the whole run; "
        "0 decodes images in the training process. Default: min(8, CPU cores per process - 1) "
        "when the model trains on a GPU or another accelerator, and 0 on the CPU, where workers "
        "only take cores from the model's own threads (on 2 cores the default job is slower "
        "with them).",
    )
    dataloader_pin_memory: bool = option(
        True, "Pin batches in page-locked memory for faster copies to a CUDA device."
    )
    dataloader_prefetch_factor: int | None = option(
        None, "Batches each worker loads ahead (default: PyTorch's 2); needs workers."
    )
    figure_images: int = option(
        4, "Images in the heatmap figure written at each evaluation (0: none)."
    )
    channels_last: bool = option(
        False, "Train with the model and images in channels-last (NHWC) memory format."
    )
    gradient_checkpointing: bool = option(
        False,
        "Recompute the blocks before the target layer in the backward instead of keeping their "
        "activations: the same results in far less memory, for about 1.2x the step time "
        "(README: Benchmarks > Cost).",
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        if self.unlabeled_batch_size is None:
            self.unlabeled_batch_size = self.per_device_train_batch_size
        for name, example in (
            ("per_device_train_batch_size", "e.g. 32"),
            ("per_device_eval_batch_size", "e.g. 64"),
            ("unlabeled_batch_size", "e.g. the train batch size"),
            ("gradient_accumulation_steps", "1 (no accumulation) or more"),
            ("num_train_epochs", "e.g. 10"),
            ("logging_steps", "e.g. 10"),
            ("max_nonfinite_steps", "e.g. 5"),
        ):
            value = getattr(self, name)
            _check(value >= 1, name, value, f"a positive integer ({example})")
        for name in (
            "max_train_steps",
            "eval_steps",
            "checkpoints_total_limit",
            "dataloader_prefetch_factor",
            "eval_explanation_images",
        ):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "a positive integer, or None")
        for name in ("warmup_steps", "cgc_warmup_steps", "eval_insertion_steps", "figure_images"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        workers = self.dataloader_num_workers
        ok = workers is None or workers >= 0
        _check(ok, "dataloader_num_workers", workers, "an integer >= 0, or None for the default")
        if workers == 0 and self.dataloader_prefetch_factor is not None:
            raise CGCValueError(
                f"dataloader_prefetch_factor={self.dataloader_prefetch_factor} needs worker "
                "processes, and dataloader_num_workers=0 loads in the training process; pass "
                "dataloader_num_workers >= 1, or no prefetch factor."
            )
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0, e.g. 42")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite number > 0")
        _check(
            self.head_learning_rate is None or self.head_learning_rate > 0,
            "head_learning_rate",
            self.head_learning_rate,
            "a finite number > 0, or None for the backbone learning rate",
        )
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a finite number >= 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "a number > 0, or None / 0 to disable clipping",
        )
        _check(self.optim in OPTIMIZERS, "optim", self.optim, OPTIMIZERS)
        scheduler, precision = self.lr_scheduler_type, self.mixed_precision
        _check(scheduler in SCHEDULERS, "lr_scheduler_type", scheduler, SCHEDULERS)
        ok = precision is None or precision in PRECISIONS
        _check(ok, "mixed_precision", precision, PRECISIONS)
        if self.mixed_precision == "fp16" and not _fp16_device_available():
            raise CGCValueError(
                "mixed_precision='fp16' needs a GPU, and none is visible; use "
                "mixed_precision='bf16' (supported on CPU) or 'no'."
            )
        _check(
            self.checkpointing_steps is None
            or self.checkpointing_steps == "epoch"
            or (isinstance(self.checkpointing_steps, int) and self.checkpointing_steps > 0),
            "checkpointing_steps",
            self.checkpointing_steps,
            "'epoch', a positive integer, or None (no intermediate checkpoints)",
        )
        self._check_best_model()
        self._check_trackers()
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise CGCValueError(
                f"overwrite_output_dir=True deletes the checkpoints that resume_from_checkpoint="
                f"{self.resume_from_checkpoint!r} would resume from; pass only one of them."
            )

    def _check_best_model(self) -> None:
        from .evaluation import METRICS, metric

        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "accuracy"
        name = self.metric_for_best_model
        if name is not None:
            keys = tuple(m.key for m in METRICS)
            _check(metric(name) is not None, "metric_for_best_model", name, keys)

    def _check_trackers(self) -> None:
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        known = tuple(str(t.value) for t in LoggerType)
        names = [n.strip() for n in str(self.report_to).split(",") if n.strip()]
        for name in names:
            _check(name == "none" or name in known, "report_to", self.report_to, ("none", *known))
        if "none" in names:
            return
        available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        missing = [n for n in names if n != "all" and n not in available]
        if missing:
            raise CGCValueError(
                f"report_to={self.report_to!r} names trackers that are not installed: "
                f"{missing}; install them (e.g. `pip install {missing[0]}`) or use one of "
                f"{sorted(available) or ['none']}."
            )

    @property
    def trackers(self) -> list[str] | None:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return None if not names or "none" in names else names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fp16_device_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


METHOD_FIELDS = tuple(
    "cgc_lambda temperature cam_method cam_target compare_size crop_scale crop_ratio flip_prob "
    "ce_on_augmented separate_views".split()
)
"""The fields that describe the method (the ones recipes expose as flags)."""


def _check(ok: bool, name: str, value: Any, allowed: Any) -> None:
    if not ok:
        allowed_text = (
            f"one of {', '.join(repr(a) for a in allowed)}"
            if isinstance(allowed, tuple)
            else allowed
        )
        raise CGCValueError(f"{name} must be {allowed_text}; got {value!r}.")
