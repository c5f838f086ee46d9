"""The target layer: which module, how its output is laid out, and how it is read.

A :class:`TargetLayer` names a module and the layout of its output (``NCHW`` maps, ``NHWC``
maps, or ``NLC`` token sequences with a number of prefix tokens); :func:`to_nchw` turns that
output into the ``(B, C, h, w)`` map Grad-CAM weighs, and :func:`capture` records it during a
forward pass. :mod:`cgc_hf.targets` decides which layer it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from .errors import TargetLayerError, close_matches

LAYOUTS = ("NCHW", "NHWC", "NLC")
_MAX_PREFIX = 16  # class, distillation and register tokens together never exceed this


@dataclass(frozen=True)
class TargetLayer:
    """Description of a Grad-CAM target layer.

    Attributes:
        name: module path inside the backbone, as in ``named_modules()``.
        layout: layout of the module's output: ``"NCHW"``, ``"NHWC"`` or ``"NLC"`` (tokens).
        num_prefix_tokens: leading non-patch tokens (class, distillation, registers) for NLC.
        linear_head: name of the classifier ``nn.Linear`` when the head is exactly
            global-average-pool + linear over this layer, which allows the closed-form CAM.
    """

    name: str
    layout: str = "NCHW"
    num_prefix_tokens: int = 0
    linear_head: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetLayer:
        return cls(**d)


def to_nchw(t: Tensor, target: TargetLayer, image_size: tuple[int, int]) -> Tensor:
    """Convert a target-layer tensor (activation or gradient) to ``(B, C, h, w)``.

    For tokens, prefix tokens are dropped and the grid is derived from the number of patch
    tokens and the input's aspect ratio, so any input resolution works.

    Args:
        t: the module output in ``target.layout``.
        target: the layer description.
        image_size: ``(H, W)`` of the input images.

    Returns:
        Tensor of shape ``(B, C, h, w)``.
    """
    if target.layout == "NCHW":
        return t
    if target.layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    tokens = t[:, target.num_prefix_tokens :]  # (B, n, C)
    gh, gw = token_grid(tokens.shape[1], image_size)
    if gh * gw != tokens.shape[1]:
        raise TargetLayerError(
            f"target layer {target.name!r} has {tokens.shape[1]} patch tokens, which do not form "
            f"a grid for an input of size {image_size}; pass target_layer= a layer whose tokens do."
        )
    return tokens.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)  # (B, C, gh, gw)


def token_grid(n: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """Grid ``(h, w)`` of ``n`` patch tokens for an image of ``image_size`` (same aspect)."""
    height, width = image_size
    gh = max(1, round(math.sqrt(n * height / width)))
    return gh, max(1, n // gh)


class Capture:
    """Holds the output of a module during a forward pass (see :func:`capture`)."""

    tensor: Tensor | None = None


@contextmanager
def capture(backbone: nn.Module, name: str, make_leaf: bool = False) -> Iterator[Capture]:
    """Record the output tensor of module ``name`` while the block runs; the hook is removed after.

    Args:
        backbone: the model.
        name: module path.
        make_leaf: if the output does not require grad (frozen weights, inference mode), replace
            it by a leaf that does, so heatmaps can still be computed.
    """
    module = get_module(backbone, name)
    store = Capture()

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        tensor, rest = _split_output(out)
        if tensor is None:
            raise TargetLayerError(
                f"target layer {name!r} returned {type(out).__name__}, not a tensor; choose a "
                "module that outputs a feature map or token sequence."
            )
        if make_leaf and not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
            out = tensor if rest is None else (tensor, *rest)
        store.tensor = tensor
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def get_module(backbone: nn.Module, name: str) -> nn.Module:
    """Return the submodule ``name``, or raise with the closest valid names."""
    modules = dict(backbone.named_modules())
    if name not in modules or name == "":
        raise TargetLayerError(
            f"target_layer {name!r} is not a module of {type(backbone).__name__}."
            f"{close_matches(name, modules)} List names with model.named_modules()."
        )
    return modules[name]


def _split_output(out: Any) -> tuple[Tensor | None, tuple | None]:
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0], tuple(out[1:])
    return None, None
