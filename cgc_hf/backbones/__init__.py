"""Build, rebuild and call timm / transformers image classifiers behind one interface.

One :class:`BackboneAdapter` per library (:mod:`.timm`, :mod:`.transformers`) holds every step
that differs between them: logits, number of labels, head reset, data config (with the
instance's own input size), rebuild from a saved description, export in the library's format,
target-layer hints, fused attention. The adapter is picked once, from the instance
(:func:`adapter_for`) or from a saved config's ``library`` (:func:`get_adapter`).

Example:
    >>> backbone = create_backbone("resnet18", num_labels=3, pretrained=False)
    >>> backbone.adapter.logits(backbone.model, torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CGCMemoryError, CGCTypeError, CGCValueError
from .base import DEFAULT_HUB, BackboneAdapter, BuildRequest, HubOptions
from .timm import TimmAdapter, is_timm_name
from .transformers import TransformersAdapter

ADAPTERS: dict[str, BackboneAdapter] = {
    adapter.library: adapter for adapter in (TransformersAdapter(), TimmAdapter())
}
"""Adapters by library name, in the order an instance is matched against them
(a transformers ``timm_wrapper`` model is a ``PreTrainedModel`` first)."""


@dataclass
class Backbone:
    """A classifier and what cgc_hf records about it.

    Attributes:
        model: the classifier.
        adapter: its library's adapter.
        architecture: timm model name, or transformers model class name.
        config: what :meth:`BackboneAdapter.rebuild` needs to build it again offline.
        base_model: Hub id of the pretrained weights it was created with (``None``: random init,
            an instance, or unknown).
    """

    model: nn.Module
    adapter: BackboneAdapter
    architecture: str
    config: dict[str, Any]
    base_model: str | None = None


def get_adapter(library: str) -> BackboneAdapter:
    """The adapter of ``library`` (``CGCConfig.library``)."""
    if library not in ADAPTERS:
        raise CGCValueError(f"library must be one of {sorted(ADAPTERS)}; got {library!r}.")
    return ADAPTERS[library]


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of the library ``model`` comes from."""
    for adapter in ADAPTERS.values():
        if adapter.owns(model):
            return adapter
    raise CGCTypeError(
        f"backbone must be a timm model or a transformers image classifier; got "
        f"{type(model).__name__}. Build one with timm.create_model(...) or "
        "AutoModelForImageClassification.from_pretrained(...)."
    )


def library_of(model: nn.Module) -> str:
    """``"transformers"`` for a ``PreTrainedModel``, ``"timm"`` for anything with a timm head."""
    return adapter_for(model).library


def target_hints(model: nn.Module) -> tuple[str | None, int | None]:
    """``(layout_hint, prefix_hint)`` for :func:`cgc_hf.targets.resolve_target`.

    timm models declare their feature layout (``output_fmt``, e.g. ``"NHWC"`` for Swin) and
    their number of class / distillation / register tokens (``num_prefix_tokens``); a
    transformers ``timm_wrapper`` model holds such a model as ``timm_model``.
    """
    return adapter_for(model).target_hints(model)


def create_backbone(
    name_or_model: str | nn.Module,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    hub: HubOptions = DEFAULT_HUB,
    image_processor: Any | None = None,
) -> Backbone:
    """Create (or adopt) a classifier with ``num_labels`` outputs.

    Args:
        name_or_model: timm name (``"resnet50"``, ``"hf-hub:timm/..."``, ``"local-dir:..."``),
            transformers Hub id or local folder, or an instance of either library's classifier.
        num_labels: number of classes; an instance's classifier is replaced when it differs.
        id2label: class names, ``{index: name}``.
        pretrained: load pretrained weights (ignored for instances).
        model_kwargs: extra arguments of ``timm.create_model`` or of the transformers config.
        hub: revision, cache folder and token of a named model's downloads (ignored for
            instances); what timm cannot apply is refused.
        image_processor: a transformers image processor to take ImageGPT's colour clusters
            from, instead of the one saved with a named model.

    Returns:
        The :class:`Backbone`.

    Raises:
        CGCMemoryError: the model does not fit in memory.
    """
    try:
        return _create(
            name_or_model, num_labels, id2label, pretrained, model_kwargs, hub, image_processor
        )
    except (torch.OutOfMemoryError, MemoryError) as err:
        name = name_or_model if isinstance(name_or_model, str) else type(name_or_model).__name__
        raise CGCMemoryError(
            f"out of memory while building the model {name!r} with model_kwargs="
            f"{model_kwargs or {}} ({type(err).__name__}). Choose a smaller model (e.g. "
            "'resnet50' or 'vit_small_patch16_224'), free memory held by other processes, or "
            "use a machine with more memory."
        ) from err


def _create(
    name_or_model: str | nn.Module,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
    hub: HubOptions,
    image_processor: Any | None = None,
) -> Backbone:
    model_kwargs = dict(model_kwargs or {})
    base_model = None
    if isinstance(name_or_model, nn.Module):
        model = name_or_model
        adapter = adapter_for(model)
        if num_labels is not None and num_labels != adapter.num_labels(model):
            adapter.reset_head(model, num_labels)
    elif isinstance(name_or_model, str):
        # "timm/<repo>" Hub ids load through transformers' timm_wrapper
        timm_name = is_timm_name(name_or_model) and not name_or_model.startswith("timm/")
        adapter = ADAPTERS["timm"] if timm_name else ADAPTERS["transformers"]
        request = BuildRequest(name_or_model, num_labels, id2label, pretrained, model_kwargs, hub)
        model = adapter.create(request)
        if pretrained:
            base_model = adapter.base_model(model, name_or_model)
    else:
        raise CGCTypeError(
            f"name_or_model must be a model name, a local directory or an nn.Module; got "
            f"{type(name_or_model).__name__}."
        )
    if id2label is not None:
        adapter.set_labels(model, id2label)
    if image_processor is not None:
        adapter.use_processor(model, image_processor)
    architecture, config = adapter.describe(model, model_kwargs)
    return Backbone(model, adapter, architecture, config, base_model)


__all__ = [
    "ADAPTERS",
    "Backbone",
    "BackboneAdapter",
    "BuildRequest",
    "HubOptions",
    "TimmAdapter",
    "TransformersAdapter",
    "adapter_for",
    "create_backbone",
    "get_adapter",
    "is_timm_name",
    "library_of",
    "target_hints",
]
