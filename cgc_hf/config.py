"""Configuration of the CGC method and of the wrapped classifier.

One dataclass is the single source of truth: it validates itself, it is saved as JSON next to
every model, and the recipes derive their command-line flags from its field metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CGCValueError

CAM_METHODS = ("grad_x_act", "gradcam")
CAM_TARGETS = ("predicted", "label")
LIBRARIES = ("timm", "transformers")
IGNORE_INDEX = -100  # label of an unlabeled row (the Hugging Face convention)
DEFAULT_CROP_SCALE = (0.08, 1.0)  # random resized crop area range (the paper's, as torchvision's)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)  # random resized crop aspect-ratio range


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
    cgc_lambda: float = field(
        default=0.5, metadata={"help": "Weight of the CGC term: loss = CE + lambda * L_CGC."}
    )
    temperature: float = field(
        default=0.5, metadata={"help": "InfoNCE temperature over heatmap cosine similarities."}
    )
    cam_method: str = field(
        default="grad_x_act",
        metadata={
            "help": "Heatmap flavour: 'grad_x_act' (the paper's element-wise gradient x "
            "activation) or 'gradcam' (gradients averaged over space, classic Grad-CAM)."
        },
    )
    cam_target: str = field(
        default="predicted",
        metadata={
            "help": "Class to explain during training: 'predicted' (argmax of the original "
            "view, works for unlabeled rows) or 'label' (ground truth where known)."
        },
    )
    compare_size: int = field(
        default=56,
        metadata={"help": "Side of the square grid on which heatmaps are compared in the loss."},
    )
    crop_scale: tuple[float, float] = field(
        default=(0.08, 1.0),
        metadata={"help": "Area range of the random resized crop, as fractions of the image."},
    )
    crop_ratio: tuple[float, float] = field(
        default=(3 / 4, 4 / 3), metadata={"help": "Aspect-ratio range of the random resized crop."}
    )
    flip_prob: float = field(
        default=0.5, metadata={"help": "Probability of a horizontal flip in the CGC view."}
    )
    ce_on_augmented: bool = field(
        default=True,
        metadata={"help": "Also apply cross-entropy to the augmented view of labeled rows."},
    )
    # --- model ----------------------------------------------------------------------------
    library: str | None = field(
        default=None, metadata={"help": "Backbone library: 'timm' or 'transformers'."}
    )
    architecture: str | None = field(
        default=None,
        metadata={"help": "timm model name, or transformers model class name of the backbone."},
    )
    backbone_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Everything needed to rebuild the backbone without downloading it."},
    )
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes."})
    id2label: dict[int, str] | None = field(
        default=None, metadata={"help": "Class index -> class name."}
    )
    target_layer: str | None = field(
        default=None,
        metadata={"help": "Module name of the Grad-CAM layer; resolved automatically if unset."},
    )
    target: dict[str, Any] | None = field(
        default=None, metadata={"help": "Resolved target-layer description (set by CGCModel)."}
    )
    data_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Input size, mean, std, interpolation the backbone was trained with."},
    )

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # JSON gives lists
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        _check(
            isinstance(self.cgc_lambda, (int, float)) and self.cgc_lambda >= 0,
            "cgc_lambda",
            self.cgc_lambda,
            "a number >= 0 (0 trains with cross-entropy alone)",
        )
        _check(
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature > 0,
            "temperature",
            self.temperature,
            "a finite number > 0, e.g. 0.5",
        )
        _check(self.cam_method in CAM_METHODS, "cam_method", self.cam_method, CAM_METHODS)
        _check(self.cam_target in CAM_TARGETS, "cam_target", self.cam_target, CAM_TARGETS)
        _check(
            isinstance(self.compare_size, int) and self.compare_size >= 2,
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
            self.num_labels is None or (isinstance(self.num_labels, int) and self.num_labels >= 1),
            "num_labels",
            self.num_labels,
            "a positive integer",
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (tuples become lists, ``id2label`` keys become strings)."""
        d = dataclasses.asdict(self)
        d["crop_scale"], d["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
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


METHOD_FIELDS = (
    "cgc_lambda",
    "temperature",
    "cam_method",
    "cam_target",
    "compare_size",
    "crop_scale",
    "crop_ratio",
    "flip_prob",
    "ce_on_augmented",
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
