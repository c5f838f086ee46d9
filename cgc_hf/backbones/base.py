"""The interface every backbone library implements, and the helpers its adapters share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import CGCValueError

if TYPE_CHECKING:
    from ..config import CGCConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HubOptions:
    """Where a named model's files come from: the Hub options of transformers' ``from_pretrained``.

    Never saved with the model: the token is a secret, and the revision and cache folder say
    where the files were found, not what the model is (its weights and description are saved).

    Attributes:
        revision: branch, tag or commit of the Hub repository (``None``: its default branch).
        cache_dir: folder of downloaded files (``None``: the huggingface_hub / timm cache).
        token: Hub token for private or gated repositories (``None``: the cached login).
    """

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = field(default=None, repr=False)

    def kwargs(self) -> dict[str, Any]:
        """The options that are set, by their ``from_pretrained`` names."""
        cache_dir = os.fspath(self.cache_dir) if self.cache_dir is not None else None
        given = {"revision": self.revision, "cache_dir": cache_dir, "token": self.token}
        return {k: v for k, v in given.items() if v is not None}


DEFAULT_HUB = HubOptions()
"""No Hub option set: each library's defaults (default branch, its cache, the saved login)."""


@dataclass(frozen=True)
class BuildRequest:
    """A classifier to build by name, as :meth:`BackboneAdapter.create` receives it.

    Attributes:
        name: timm model name, or transformers Hub id or local folder.
        num_labels: number of classes (``None``: the checkpoint's).
        id2label: class names, ``{index: name}``.
        pretrained: load pretrained weights.
        model_kwargs: extra arguments of ``timm.create_model`` or of the transformers config.
        hub: revision, cache folder and token of the downloads.
    """

    name: str
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    pretrained: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    hub: HubOptions = DEFAULT_HUB


class BackboneAdapter(ABC):
    """What cgc_hf needs from a classifier library, in one place per library.

    An adapter holds no state: it is picked once per model (from the instance with
    :func:`cgc_hf.backbones.adapter_for`, from a saved config with
    :func:`cgc_hf.backbones.get_adapter`) and every library-specific step goes through it, so no
    other module asks which library a model comes from.

    Attributes:
        library: the name saved in ``CGCConfig.library``.
        export_usage: Python snippet that loads :meth:`export`'s folder without cgc_hf (model card).
    """

    library: ClassVar[str]
    export_usage: ClassVar[str]

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is a classifier of this library."""

    @abstractmethod
    def create(self, request: BuildRequest) -> nn.Module:
        """Build the classifier ``request.name`` with ``request.num_labels`` outputs; downloads
        follow ``request.hub``."""

    @abstractmethod
    def describe(
        self, model: nn.Module, model_kwargs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """``(architecture, backbone_config)``: what :meth:`rebuild` needs to build it again."""

    @abstractmethod
    def rebuild(self, architecture: str, backbone_config: dict[str, Any]) -> nn.Module:
        """Build the architecture of :meth:`describe` again, random weights, no download."""

    @abstractmethod
    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """Class logits ``(B, K)``.

        Shape:
            pixel_values: ``(B, 3, H, W)``.
        """

    @abstractmethod
    def num_labels(self, model: nn.Module) -> int:
        """Number of classes the classifier outputs."""

    def id2label(self, model: nn.Module) -> dict[int, str] | None:
        """Class names the model carries, ``{index: name}``, if any."""
        return None

    def set_labels(self, model: nn.Module, id2label: dict[int, str]) -> None:  # noqa: B027
        """Record class names on the model where its library keeps them (timm keeps none)."""

    @abstractmethod
    def classifier(self, model: nn.Module) -> list[nn.Module]:
        """The module(s) that map features to class logits (several for DeiT with teacher)."""

    @abstractmethod
    def reset_head(self, model: nn.Module, num_labels: int) -> None:
        """Replace the classifier by a new one with ``num_labels`` outputs."""

    @abstractmethod
    def data_config(
        self, model: nn.Module, source: str | None, hub: HubOptions = DEFAULT_HUB
    ) -> dict[str, Any]:
        """Input size, mean, std, interpolation and crop of the backbone (JSON values).

        The input size is the instance's own (a model built with ``img_size=64`` is fed 64 px);
        a model that accepts any size keeps the size of its pretrained preprocessing.

        Args:
            model: the classifier.
            source: the name or folder it was created from, whose saved preprocessing
                (transformers image processor) is read, or the image processor given to
                ``from_backbone`` instead; ``None`` for an instance without one.
            hub: where ``source``'s files come from.
        """

    def use_processor(self, model: nn.Module, processor: Any) -> None:
        """Take what ``model`` needs from the image processor given to ``from_backbone``
        (ImageGPT's colour clusters); the preprocessing itself is read by :meth:`data_config`."""
        raise CGCValueError(
            f"image_processor is for transformers models; got a {self.library} model, whose "
            "preprocessing comes from the model itself. Leave image_processor unset."
        )

    def target_hints(self, model: nn.Module) -> tuple[str | None, int | None]:
        """``(layout, prefix tokens)`` the model declares, for :func:`~cgc_hf.resolve_target`."""
        return None, None

    def disable_fused_attention(self, model: nn.Module, keep: Collection[nn.Module] = ()) -> None:
        """Switch attention to an implementation with a double backward (fused SDPA has none),
        except in the modules of ``keep`` (:func:`cgc_hf.attention.finished_before`), which
        keep the implementation they were built with."""
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                built = module.__dict__.setdefault("_cgc_built_fused_attn", module.fused_attn)
                module.fused_attn = bool(built) and module in keep

    @abstractmethod
    def export(self, model: nn.Module, folder: Path, config: CGCConfig) -> None:
        """Write the classifier into ``folder`` in the library's own format."""

    def unrecordable_kwargs(self, model: nn.Module, backbone_config: dict[str, Any]) -> list[str]:
        """Constructor arguments of ``model`` that ``backbone_config`` cannot hold."""
        return []

    @abstractmethod
    def rebuild_hint(self, model: nn.Module, config: CGCConfig) -> str:
        """How to build the model so that :meth:`rebuild` reproduces it (an error's fix)."""

    def base_model(self, model: nn.Module, source: str | None) -> str | None:
        """Hub id of the pretrained weights ``model`` was created with, if known."""
        return None

    def license(self, model: nn.Module) -> str | None:
        """License of the pretrained weights, as their config states it."""
        return None


def pair(size: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """``(h, w)`` from a side or a pair."""
    if isinstance(size, int):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def jsonable(d: Any) -> Any:
    """``d`` with tuples as lists, keys as strings and other objects (dtypes, enums) as text."""
    if isinstance(d, dict):
        return {str(k): jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    if isinstance(d, torch.dtype):
        return str(d)
    return str(d)
