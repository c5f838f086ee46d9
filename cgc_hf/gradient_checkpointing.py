"""Gradient checkpointing of the blocks that run before the target layer.

A checkpointed block keeps only its input during the forward and runs again in the backward to
rebuild what its backward needs (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant). The
CGC loss differentiates the modules after the target layer twice (:mod:`cgc_hf.attention`), and a
recomputed forward inside that second-order graph is neither needed nor tested; the blocks that
have returned before the target layer returns are differentiated once, as in plain training, and
for a ViT they are nearly all of the model. So only they are checkpointed: on a ViT at 768 px
this is the difference between keeping every block's activations of 2B views and keeping one
``(2B, L, D)`` tensor per block.

Results are unchanged: the recomputation replays the random state of the first forward
(dropout, drop-path), and BatchNorm running statistics are restored after it, so they are
updated once per step as without checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import finished_before


def checkpoint_units(
    backbone: nn.Module, target: str, run: Callable[[], object]
) -> list[nn.Module]:
    """The outermost modules whose every forward returned before the target layer's.

    A container (``nn.Sequential``, ``nn.ModuleList``) gives its children instead, so that each
    block of a stack is one unit: recomputing a whole stack at once would hold all its
    activations again. Leaf modules and modules without parameters are left out: checkpointing
    them keeps the same input they keep anyway.

    Args:
        backbone: the model.
        target: module path of the target layer.
        run: one forward pass of ``backbone`` (run in eval mode without gradients).
    """
    named = dict(backbone.named_modules())
    before = finished_before(backbone, target, run, [m for n, m in named.items() if n])
    parent = {m: named[n.rpartition(".")[0]] for n, m in named.items() if n}
    units, todo = [], [m for n, m in named.items() if m in before and parent[m] not in before]
    while todo:
        module = todo.pop(0)
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            todo[:0] = list(module)
        elif any(True for _ in module.children()) and any(True for _ in module.parameters()):
            units.append(module)
    return units


def enable(units: list[nn.Module], backbone: nn.Module) -> None:
    """Run each module of ``units`` under gradient checkpointing when gradients are recorded.

    A transformers model that keeps a key / value cache (ImageGPT) stops keeping it: its blocks
    append to the cache, so a recomputed block would find twice the keys. An image classifier
    never reads the cache; :func:`disable` restores the setting.
    """
    config = getattr(backbone, "config", None)
    if getattr(config, "use_cache", False):
        backbone.__dict__["_cgc_use_cache"] = config.use_cache
        config.use_cache = False
    for module in units:
        if not isinstance(module.__dict__.get("forward"), Checkpointed):
            module.forward = Checkpointed(module.forward, module)


def disable(backbone: nn.Module) -> None:
    """Undo :func:`enable` on every module of ``backbone``."""
    for module in backbone.modules():
        if isinstance(module.__dict__.get("forward"), Checkpointed):
            del module.forward  # the class's forward again
    if "_cgc_use_cache" in backbone.__dict__:
        backbone.config.use_cache = backbone.__dict__.pop("_cgc_use_cache")


def checkpointed(backbone: nn.Module) -> list[nn.Module]:
    """The modules of ``backbone`` that :func:`enable` wraps."""
    return [m for m in backbone.modules() if isinstance(m.__dict__.get("forward"), Checkpointed)]


class Checkpointed:
    """A module's forward, run through :func:`torch.utils.checkpoint.checkpoint`.

    An instance (not a closure) so that ``copy.deepcopy`` of the model wraps the copy's own
    forward, and pickling works.
    """

    def __init__(self, forward: Callable[..., Any], module: nn.Module) -> None:
        self.forward = forward
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        calls = [0]

        def run(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return self.forward(*a, **k)
            with _running_stats_kept(self.module):  # the recomputation in the backward
                return self.forward(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of ``module`` when the block exits: the
    recomputation must not count a batch twice."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [
        [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved):
                for buffer, value in zip(
                    (m.running_mean, m.running_var, m.num_batches_tracked), values
                ):
                    buffer.copy_(value)
