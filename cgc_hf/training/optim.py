"""The optimizer and learning-rate schedule of a run.

Two learning rates (backbone, classifier head: a new head usually learns faster) times two
weight-decay settings (biases and normalisation scales are not decayed, the usual fine-tuning
rule) give at most four parameter groups.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW or SGD over ``model``'s trainable parameters, in (head, decay) groups.

    Args:
        model: a :class:`~cgc_hf.CGCModel` (its ``head_parameters()`` get ``head_learning_rate``).
        args: the run's :class:`~cgc_hf.CGCTrainingArguments`.
    """
    head_ids = {id(p) for p in model.head_parameters()}
    if not head_ids and args.head_learning_rate is not None:
        logger.warning("no classifier head found; head_learning_rate is not applied.")
    exempt = _no_weight_decay(model.backbone)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            decay = p.ndim > 1 and not _listed(name, exempt)
            groups.setdefault((id(p) in head_ids, decay), []).append(p)
    seen = {id(p) for params in groups.values() for p in params}
    for p in model.parameters():  # anything the wrapper holds beside the backbone
        if p.requires_grad and id(p) not in seen:
            groups.setdefault((id(p) in head_ids, p.ndim > 1), []).append(p)
    head_lr = args.head_learning_rate or args.learning_rate
    param_groups = [
        {
            "params": params,
            "lr": head_lr if is_head else args.learning_rate,
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        for (is_head, decay), params in sorted(groups.items())
    ]
    if args.optim == "sgd":
        return torch.optim.SGD(param_groups, lr=args.learning_rate, momentum=args.momentum)
    return torch.optim.AdamW(param_groups, lr=args.learning_rate)


def _no_weight_decay(backbone: nn.Module) -> set[str]:
    """Names the model exempts from weight decay (timm's ``no_weight_decay()``: pos_embed...)."""
    names = getattr(backbone, "no_weight_decay", None)
    return set(names()) if callable(names) else set()


def _listed(name: str, exempt: set[str]) -> bool:
    """``name`` or one of its parent modules is exempt (``pos_embed``, ``blocks.0.gamma``)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in exempt for i in range(1, len(parts) + 1))


def warmup_steps(args: Any, max_steps: int) -> int:
    """Optimizer steps of linear warmup: ``warmup_steps``, else ``warmup_ratio`` of the run."""
    return args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: Any, max_steps: int, num_processes: int
) -> Any:
    """The learning-rate schedule, counted in scheduler calls.

    Accelerate steps a prepared scheduler once per process at each optimizer step, so the step
    counts are multiplied by the number of processes.
    """
    from transformers import get_scheduler

    kind, warmup = args.lr_scheduler_type, warmup_steps(args, max_steps)
    total = max_steps * num_processes
    if kind == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=(warmup / max_steps) if warmup else 0.3,
            anneal_strategy="cos",
            cycle_momentum=False,  # AdamW's betas and SGD's momentum stay as they are
        )
    if kind == "constant" and warmup:
        # transformers' "constant" ignores the warmup, which is not what the options say.
        logger.info(
            "lr_scheduler_type='constant' with %d warmup steps: constant_with_warmup", warmup
        )
        kind = "constant_with_warmup"
    return get_scheduler(
        kind, optimizer, num_warmup_steps=warmup * num_processes, num_training_steps=total
    )


def cgc_ramp(step: int, ramp: int) -> float:
    """Share of cgc_lambda at ``step`` of a ``ramp``-step warm-up: 0 at step 0, then linear to 1."""
    return 1.0 if ramp == 0 or step >= ramp else step / ramp
