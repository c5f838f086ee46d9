"""Fully sharded training (FSDP2, Accelerate's FSDP plugin) of a CGC model.

``accelerate launch --use_fsdp --fsdp_version 2`` (or an ``accelerate config`` file with
``distributed_type: FSDP``) makes Accelerate shard parameters, gradients and optimizer state
over the processes. The CGC step needs one thing FSDP does not give by default: the heatmap is
the gradient of the class score with respect to the target layer's output, and the CGC loss
differentiates it again, so every module from the target layer to the classifier is used twice
within one forward (once for the logits, once inside ``torch.autograd.grad``) and its parameters
must stay gathered from the forward to the end of the backward. FSDP2 reshards a unit after its
forward and hands out sharded ``DTensor`` parameters in between, which breaks that pass
(``aten.mm.default got mixed torch.Tensor and DTensor`` for a ViT whose last block is its own
unit). Here the blocks the plugin's wrap policy selects *before* the target layer become FSDP
units, and the rest (the target layer's block, the final norm, the head) belongs to the root
unit, whose parameters are gathered for the whole step. The memory of the deep part of the model
is sharded as usual; only the last block and the head are held whole during a step.

Parameters whose first dimension is shorter than the process count (a ViT's class token and
position embedding) are sharded on another dimension (:func:`_placement`), so that a resumed
run is exact. FSDP1 (``fsdp_version=1``), activation checkpointing (FSDP's or
``gradient_checkpointing``), figures, the subset evaluation and ``load_best_model_at_end`` are
refused before training (:func:`check_fsdp`), each with what works instead. The final model is
gathered into a plain :class:`CGCModel` (:func:`full_model`), so ``save_pretrained`` writes the
same files as an unsharded run.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..errors import CGCValueError

logger = logging.getLogger(__name__)


def fsdp_plugin(accelerator: Any) -> Any | None:
    """The run's ``FullyShardedDataParallelPlugin`` when Accelerate trains with FSDP, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.state.fsdp_plugin


def check_fsdp(model: nn.Module, args: Any, accelerator: Any) -> None:
    """Refuse, before training, what a CGC run cannot do under FSDP; name what works instead."""
    plugin = fsdp_plugin(accelerator)
    if plugin is None:
        return
    if plugin.fsdp_version != 2:
        raise CGCValueError(
            f"fsdp_version={plugin.fsdp_version}: CGCTrainer shards with FSDP2 only, which keeps "
            "the modules of the second-order heatmap pass gathered; use fsdp_version 2 "
            "(accelerate launch --use_fsdp --fsdp_version 2, or fsdp_version: 2 in the "
            "accelerate config), or DDP (plain accelerate launch / torchrun)."
        )
    if plugin.activation_checkpointing:
        raise CGCValueError(
            "fsdp_activation_checkpointing=true: the CGC heatmap differentiates the last "
            "block's recomputed graph a second time, which this trainer does not support under "
            "activation checkpointing; train without it (--fsdp_activation_checkpointing false), "
            "or with a smaller per-device batch."
        )
    if getattr(args, "gradient_checkpointing", False):
        raise CGCValueError(
            "gradient_checkpointing=True is not supported under FSDP yet (the recomputed blocks "
            "would gather their shards again in the backward, untested here); drop "
            "--gradient_checkpointing, or train with DDP (plain accelerate launch / torchrun)."
        )
    if args.figure_images:
        raise CGCValueError(
            f"figure_images={args.figure_images}: figures are drawn by the main process alone, "
            "and under FSDP every forward needs all processes (each holds a shard of the "
            "weights); pass --figure_images 0, and draw figures from the saved model "
            "(recipes/evaluate.py)."
        )
    if args.eval_explanation_images is not None:
        raise CGCValueError(
            f"eval_explanation_images={args.eval_explanation_images}: the explanation metrics "
            "of a subset run different numbers of forward passes in the processes, which FSDP "
            "cannot (every process takes part in each pass); leave it unset (every image), or "
            "evaluate the saved model with recipes/evaluate.py."
        )
    if args.load_best_model_at_end:
        raise CGCValueError(
            "load_best_model_at_end=True reads the best checkpoint's model.safetensors, which "
            "an FSDP checkpoint does not have (its weights are sharded); pass "
            "--no_load_best_model_at_end, and resume or evaluate the best checkpoint instead."
        )


def heatmap_path(model: nn.Module) -> set[str]:
    """Names (in ``model``) of the modules the second-order heatmap pass runs through.

    These are the target layer, the modules containing it, and every module registered after it
    (the blocks, norms and head that turn the target's output into the logits).
    """
    names = [name for name, _ in model.named_modules()]
    target = f"backbone.{model.target.name}"
    index = names.index(target)
    return {
        name
        for i, name in enumerate(names)
        if i >= index or target.startswith(f"{name}.") or name == ""
    }


def shard_model(model: nn.Module, args: Any, accelerator: Any) -> None:
    """Apply FSDP2 to ``model`` in place when the run uses FSDP (nothing otherwise).

    The plugin's wrap policy (``fsdp_auto_wrap_policy``: transformer layer classes or a size)
    picks the units among the modules before the target layer; the root unit holds the rest.
    Accelerate's ``prepare`` then finds the model already sharded and prepares the optimizer,
    state dicts and checkpoints for it as for any FSDP2 model.
    """
    plugin = fsdp_plugin(accelerator)
    if plugin is None:
        return
    check_fsdp(model, args, accelerator)
    from accelerate.utils.fsdp_utils import (
        fsdp2_prepare_auto_wrap_policy,
        get_module_children_bottom_up,
    )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if plugin.cpu_ram_efficient_loading:
        logger.warning(
            "fsdp_cpu_ram_efficient_loading is not used: every process holds the whole model "
            "in CPU memory until it is sharded (the CGC model is sharded before prepare)."
        )
    # No .to(device) first: fully_shard moves each unit's shard to the device, so the whole
    # model never has to fit one.
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    kwargs = {
        "shard_placement_fn": _placement(accelerator.num_processes),
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    keep = heatmap_path(model)
    by_module = {m: name for name, m in model.named_modules()}
    units = []
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if by_module.get(module) not in keep and policy(module):
                fully_shard(module, **kwargs)
                units.append(by_module[module])
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    fully_shard(model, **root)  # the root is gathered for the whole step
    logger.info(
        "FSDP2: %d sharded units before the target layer %s (%s); the rest is the root unit",
        len(units),
        model.target.name,
        ", ".join(units[:3]) + (", ..." if len(units) > 3 else "") or "none",
    )


def _placement(world: int) -> Any:
    """Shard a parameter whose first dimension is shorter than the process count on another.

    FSDP2 shards on dimension 0 by default, which leaves processes with an empty shard of a
    ``(1, N, D)`` class token or position embedding. An empty shard takes no optimizer step, so
    those processes hold a different Adam step count for it, and a sharded checkpoint keeps
    one process's count for all: the resumed run's update of that parameter then differs.
    FSDP2 shards other dimensions only evenly, so the first dimension the count divides is used.
    """
    from torch.distributed.tensor import Shard

    def place(param: nn.Parameter) -> Any:
        if param.ndim == 0 or param.shape[0] >= world:
            return None  # FSDP2's default, dimension 0
        even = [d for d, size in enumerate(param.shape) if size % world == 0]
        if not even:
            logger.warning(
                "FSDP: a parameter of shape %s has an empty shard in some of the %d processes "
                "(no dimension divides evenly); a run resumed from a sharded checkpoint may "
                "update it slightly differently than an uninterrupted one.",
                tuple(param.shape),
                world,
            )
            return None
        return Shard(even[0])

    return place


def full_model(model: nn.Module, accelerator: Any, wait: bool = True) -> nn.Module | None:
    """The trained model with whole weights, for ``save_pretrained``.

    Under FSDP every process must call this (the weights are gathered from all of them); the
    main process gets a plain :class:`~cgc_hf.CGCModel` on the CPU holding the full state dict,
    the others None. Without FSDP it is the unwrapped model itself. With ``wait`` every process
    first waits for the others (to finish training).
    """
    if wait:
        accelerator.wait_for_everyone()
    if fsdp_plugin(accelerator) is None:
        return accelerator.unwrap_model(model)
    import copy

    from ..modeling import CGCModel

    state = accelerator.get_state_dict(model)  # full weights on the main process's CPU
    if not accelerator.is_main_process:
        return None
    plain = CGCModel(copy.deepcopy(model.config))  # the same architecture, not sharded
    plain.load_state_dict(state, strict=True)
    plain.cgc_weight = model.cgc_weight
    return plain
