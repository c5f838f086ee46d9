"""Which attention modules the CGC step differentiates twice, and which keep the fused kernel.

The CGC loss differentiates the heatmap, itself the gradient of the class score with respect to
the target layer's output, so every module that runs after the target layer is differentiated
twice. PyTorch's fused scaled-dot-product attention has no double backward: those modules
compute attention explicitly. The modules that have returned before the target layer returns
only produced its input and are differentiated once, so they keep the fused kernel (timm's
``fused_attn``), which saves no attention matrix for the backward; for a ViT at 768 px one
layer's matrix for a batch of 8 views is 2 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .metrics import eval_mode
from .target_layer import get_module


def attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """Modules that can switch between fused and explicit attention (timm's ``fused_attn``)."""
    return [m for m in backbone.modules() if hasattr(m, "fused_attn")]


def finished_before(
    backbone: nn.Module,
    target: str,
    run: Callable[[], object],
    modules: Sequence[nn.Module] | None = None,
) -> set[nn.Module]:
    """Modules whose every forward returned before the target layer's forward returned.

    Args:
        backbone: the model.
        target: module path of the target layer.
        run: one forward pass of ``backbone``; it runs in eval mode without gradients, so
            BatchNorm statistics are not touched.
        modules: the modules to sort (default: the attention modules).

    Returns:
        The modules differentiated only once by the CGC loss (those attention modules may keep
        the fused kernel); a module that did not run is not included.
    """
    modules = attention_modules(backbone) if modules is None else list(modules)
    if not modules:
        return set()
    returned = [False]  # whether the target layer has returned
    before: set[nn.Module] = set()
    after: set[nn.Module] = set()

    def on_return(module: nn.Module, _inputs: object, _output: object) -> None:
        (after if returned[0] else before).add(module)

    def on_target(_module: nn.Module, _inputs: object, _output: object) -> None:
        returned[0] = True

    # The target's own hook first: an attention module that is the target layer returns with it.
    handles = [get_module(backbone, target).register_forward_hook(on_target)]
    handles += [m.register_forward_hook(on_return) for m in modules]
    try:
        with torch.no_grad(), eval_mode(backbone):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return before - after
