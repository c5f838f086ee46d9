"""CGCTrainer: semi-supervised CGC fine-tuning over Hugging Face Accelerate.

One optimizer step sees a labeled batch and an unlabeled batch (labels ``-100``) concatenated:
cross-entropy uses the labeled rows, the CGC term all rows (Pillai et al., CVPR 2022, sec. 3.3).
Accelerate supplies devices, DDP, mixed precision, gradient accumulation, trackers and
checkpoint state; this module adds what exact, safe resumption needs:

- data order and data augmentation are pure functions of ``(seed, epoch, index)``, so a resumed
  run sees the same batches with the same augmentations, whatever the loader's look-ahead or
  worker count; the global RNG (restored by ``load_state``) is left to the model (CGC geometry,
  dropout), and evaluation draws from its own generator;
- checkpoints are written to a temporary directory and renamed once complete;
- a non-finite loss skips the update (and restores the BatchNorm statistics it touched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .distributed import all_gather_rows
from .errors import CGCError, CGCMemoryError, CGCValueError, CheckpointError
from .modeling import IGNORE_INDEX, CGCModel
from .sampling import EpochSampler, SeededItems

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
CHECKPOINT_PREFIX = "step_"
COMPLETE = "COMPLETE"  # marker file: its presence makes a checkpoint directory usable


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (every device), as the trainer does before training."""
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(seed)


def _tracker_names() -> tuple[str, ...]:
    from accelerate.utils import LoggerType

    return tuple(str(t.value) for t in LoggerType)


@dataclass
class TrainingArguments:
    """Options of a :class:`CGCTrainer` run (names follow ``transformers.TrainingArguments``).

    Example:
        >>> args = TrainingArguments(output_dir="runs/cub", per_device_train_batch_size=32,
        ...                          learning_rate=1e-4, head_learning_rate=1e-3)
    """

    output_dir: str = field(
        default="cgc-output", metadata={"help": "Where arguments, metrics, checkpoints go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a previous run in output_dir (otherwise it is refused)."},
    )
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Labeled images per device and step (>= 2 for CGC: negatives)."},
    )
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "Images per device and evaluation batch."}
    )
    unlabeled_batch_size: int | None = field(
        default=None,
        metadata={"help": "Unlabeled images per device and step (default: the train batch size)."},
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Peak learning rate of the backbone."}
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the classifier head (default: learning_rate)."},
    )
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "Weight decay (not applied to biases and normalisation weights)."},
    )
    optim: str = field(default="adamw", metadata={"help": "Optimizer: 'adamw' or 'sgd'."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule after warmup: 'cosine', 'linear', 'constant'."},
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the optimizer steps used for linear warmup."}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Warmup steps; overrides warmup_ratio when > 0."}
    )
    num_train_epochs: int = field(
        default=3, metadata={"help": "Passes over the labeled data (unless max_train_steps)."}
    )
    max_train_steps: int | None = field(
        default=None,
        metadata={"help": "Total optimizer steps; overrides num_train_epochs when set."},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches accumulated per optimizer step."}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Gradient clipping norm; None or 0 disables clipping."}
    )
    mixed_precision: str = field(
        default="no", metadata={"help": "'no', 'bf16' or 'fp16' (fp16 needs a GPU)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of weights-independent randomness."})
    checkpointing_steps: str | int | None = field(
        default=None,
        metadata={"help": "Save the training state every N optimizer steps, or 'epoch'."},
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most this many checkpoints (oldest deleted)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' (newest complete checkpoint in output_dir) or a path."},
    )
    report_to: str = field(
        default="none",
        metadata={"help": "Trackers: 'none', 'all', or a comma list such as 'tensorboard,wandb'."},
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log training loss every N optimizer steps."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (default: each epoch)."}
    )
    eval_insertion_steps: int = field(
        default=0,
        metadata={"help": "Steps of the insertion / deletion AUC metric (0 skips it: slow)."},
    )
    cgc_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps over which the CGC weight grows linearly from 0 to "
            "cgc_lambda (0: full weight from the start, as in the paper). Helps from random "
            "weights, whose first heatmaps carry no signal."
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "Stop after this many optimizer steps in a row with a non-finite loss."},
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Worker processes per data loader."}
    )
    figure_images: int = field(
        default=4,
        metadata={"help": "Images in the heatmap figure written at each evaluation (0: none)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.checkpointing_steps, str) and self.checkpointing_steps.isdigit():
            self.checkpointing_steps = int(self.checkpointing_steps)
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        if self.unlabeled_batch_size is None:
            self.unlabeled_batch_size = self.per_device_train_batch_size
        _positive_int(self, "per_device_train_batch_size", "e.g. 32")
        _positive_int(self, "per_device_eval_batch_size", "e.g. 64")
        _positive_int(self, "unlabeled_batch_size", "e.g. the train batch size")
        _positive_int(self, "gradient_accumulation_steps", "1 (no accumulation) or more")
        _positive_int(self, "num_train_epochs", "e.g. 10")
        _positive_int(self, "logging_steps", "e.g. 10")
        _positive_int(self, "max_nonfinite_steps", "e.g. 5")
        for name in ("max_train_steps", "eval_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                _positive_int(self, name, "a positive integer, or None")
        for name in (
            "warmup_steps",
            "cgc_warmup_steps",
            "eval_insertion_steps",
            "dataloader_num_workers",
            "figure_images",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, value, "an integer >= 0")
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        _require(
            self.head_learning_rate is None or self.head_learning_rate > 0,
            "head_learning_rate",
            self.head_learning_rate,
            "a number > 0, or None for the backbone learning rate",
        )
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "a number > 0, or None / 0 to disable clipping",
        )
        _require(self.optim in OPTIMIZERS, "optim", self.optim, _one_of(OPTIMIZERS))
        _require(
            self.lr_scheduler_type in SCHEDULERS,
            "lr_scheduler_type",
            self.lr_scheduler_type,
            _one_of(SCHEDULERS),
        )
        _require(
            self.mixed_precision in PRECISIONS,
            "mixed_precision",
            self.mixed_precision,
            _one_of(PRECISIONS),
        )
        if self.mixed_precision == "fp16" and not _fp16_device_available():
            raise CGCValueError(
                "mixed_precision='fp16' needs a GPU, and none is visible; use "
                "mixed_precision='bf16' (supported on CPU) or 'no'."
            )
        _require(
            self.checkpointing_steps is None
            or self.checkpointing_steps == "epoch"
            or (isinstance(self.checkpointing_steps, int) and self.checkpointing_steps > 0),
            "checkpointing_steps",
            self.checkpointing_steps,
            "'epoch', a positive integer, or None (no intermediate checkpoints)",
        )
        names = [n.strip() for n in str(self.report_to).split(",") if n.strip()]
        known = _tracker_names()
        for name in names:
            _require(
                name == "none" or name in known,
                "report_to",
                self.report_to,
                _one_of(("none", *known)),
            )
        if "none" not in names:
            from accelerate.tracking import get_available_trackers

            available = {
                str(t.value) if hasattr(t, "value") else str(t) for t in get_available_trackers()
            }
            missing = [n for n in names if n != "all" and n not in available]
            if missing:
                raise CGCValueError(
                    f"report_to={self.report_to!r} names trackers that are not installed: "
                    f"{missing}; install them (e.g. `pip install {missing[0]}`) or use one of "
                    f"{sorted(available) or ['none']}."
                )
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise CGCValueError(
                f"overwrite_output_dir=True deletes the checkpoints that resume_from_checkpoint="
                f"{self.resume_from_checkpoint!r} would resume from; pass only one of them."
            )

    @property
    def trackers(self) -> list[str] | None:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return None if not names or "none" in names else names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise CGCValueError(f"{name} must be {allowed}; got {value!r}.")


def _positive_int(args: Any, name: str, example: str) -> None:
    value = getattr(args, name)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        name,
        value,
        f"a positive integer ({example})",
    )


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _fp16_device_available() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


# ---------------------------------------------------------------------------------- state
@dataclass
class TrainerState:
    """Everything beyond Accelerate's state that a resumed run needs (saved in ``COMPLETE``)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # labeled batches of this process already used in ``epoch``
    unlabeled_epoch: int = 0
    unlabeled_batches: int = 0  # unlabeled batches already used in ``unlabeled_epoch``
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    loss_sum: float = 0.0  # over finite batches since step 0: a resumed run reports the same mean
    loss_batches: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)


class CGCTrainer:
    """Fine-tune a :class:`CGCModel` with cross-entropy + CGC, labeled and unlabeled data.

    Implements the training of Pillai et al., "Consistent Explanations by Contrastive Learning",
    CVPR 2022, on Hugging Face Accelerate (any device count, mixed precision, trackers).

    Example:
        >>> model = CGCModel.from_backbone("resnet50", num_labels=200)
        >>> args = TrainingArguments(output_dir="runs/cub", num_train_epochs=30)
        >>> trainer = CGCTrainer(model, args, train_ds, eval_ds, unlabeled_dataset=pool_ds)
        >>> metrics = trainer.train()  # {"eval_accuracy": ..., "eval_content_heatmap": ...}

    Args:
        model: the model to train.
        args: run options.
        train_dataset: labeled items ``{"pixel_values": (3, H, W), "labels": int}``.
        eval_dataset: items as above, optionally with ``"mask"`` ``(H, W)`` for Content Heatmap.
        unlabeled_dataset: items with ``"pixel_values"``; their labels are ignored.
        data_collator: batches a list of items (default: stack every key).
        run_info: extra JSON facts saved in ``args.json`` (dataset, split), never secrets.
    """

    def __init__(
        self,
        model: CGCModel,
        args: TrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        unlabeled_dataset: Dataset | None = None,
        *,
        data_collator: Callable[[list[Any]], dict[str, Tensor]] | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.args = args
        self.output_dir = Path(args.output_dir)
        self.collate = data_collator or default_collate
        self.run_info = _without_secrets(run_info or {})
        if len(train_dataset) == 0:
            raise CGCValueError("train_dataset is empty; it needs at least one labeled image.")
        if unlabeled_dataset is not None and len(unlabeled_dataset) == 0:
            unlabeled_dataset = None
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.trackers,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            rng_types=[],  # data order is seeded per epoch by EpochSampler, not by global RNG
            # Without a GPU, Accelerate only forms a multi-process (gloo) group when told it
            # runs on CPU; saying so makes a plain `torchrun` on a CPU machine work too.
            cpu=not _has_accelerator(),
        )
        acc = self.accelerator
        rows = args.per_device_train_batch_size + (
            args.unlabeled_batch_size if unlabeled_dataset is not None else 0
        )
        if model.config.cgc_lambda > 0 and rows * acc.num_processes < 2:
            raise CGCValueError(
                f"per_device_train_batch_size={args.per_device_train_batch_size} gives 1 image "
                "per step, and the CGC loss needs other images as negatives; use a batch size "
                ">= 2, add unlabeled data, or set cgc_lambda=0 for plain fine-tuning."
            )
        if acc.num_processes > 1:
            # Negatives from every process: the loss then matches one process on the full batch.
            model.loss_fn.gather = all_gather_rows
        self._check_output_dir()

        self.train_sampler = EpochSampler(len(train_dataset), args.seed)
        train_loader = self._loader(
            SeededItems(train_dataset, args.seed, 0),
            self.train_sampler,
            args.per_device_train_batch_size,
            drop_last=False,
        )
        self.unlabeled_loader = None
        if unlabeled_dataset is not None:
            # Sharded by our own sampler and not prepared: Accelerate's end-of-epoch bookkeeping
            # (which decides when accumulated gradients sync) must follow the labeled loader only.
            self.unlabeled_sampler = EpochSampler(
                len(unlabeled_dataset),
                args.seed + 1,
                num_replicas=acc.num_processes,
                rank=acc.process_index,
            )
            self.unlabeled_loader = self._loader(
                SeededItems(unlabeled_dataset, args.seed, 1),
                self.unlabeled_sampler,
                args.unlabeled_batch_size,
                drop_last=True,
            )
            if len(self.unlabeled_loader) == 0:
                raise CGCValueError(
                    f"unlabeled_batch_size={args.unlabeled_batch_size} is larger than the "
                    f"{len(self.unlabeled_sampler)} unlabeled images of each process; lower it."
                )
        eval_loader = None
        if eval_dataset is not None and len(eval_dataset) > 0:
            eval_loader = DataLoader(
                eval_dataset,
                batch_size=args.per_device_eval_batch_size,
                shuffle=False,
                collate_fn=self.collate,
                num_workers=args.dataloader_num_workers,
                generator=torch.Generator().manual_seed(args.seed),
            )

        optimizer = self._optimizer(model)
        steps_per_epoch = math.ceil(
            math.ceil(len(train_dataset) / (args.per_device_train_batch_size * acc.num_processes))
            / args.gradient_accumulation_steps
        )
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / steps_per_epoch)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.max_steps)
        from transformers import get_scheduler

        # Accelerate steps a prepared scheduler once per process at each optimizer step.
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=warmup * acc.num_processes,
            num_training_steps=self.max_steps * acc.num_processes,
        )
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(
            model, optimizer, train_loader, scheduler
        )
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        self.state = TrainerState()

    # ------------------------------------------------------------------------------ building
    def _loader(
        self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=self.collate,
            num_workers=self.args.dataloader_num_workers,
            # Own generator: creating an iterator must not draw from the global RNG.
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    def _optimizer(self, model: CGCModel) -> torch.optim.Optimizer:
        args = self.args
        head_ids = (
            {id(p) for p in _head_module(model).parameters()}
            if _head_module(model) is not None
            else set()
        )
        if not head_ids and args.head_learning_rate is not None:
            logger.warning("no classifier head found; head_learning_rate is not applied.")
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in model.parameters():
            if p.requires_grad:
                # Biases and normalisation scales are not decayed (the usual fine-tuning rule).
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

    # ------------------------------------------------------------------------------ output dir
    def _check_output_dir(self) -> None:
        args, out = self.args, self.output_dir
        finished = _finished(out)
        has_run = (out / "args.json").exists() or (out / "checkpoints").exists()
        if args.overwrite_output_dir:
            if has_run and self.accelerator.is_main_process:
                shutil.rmtree(out)  # a previous cgc_hf run: replaced whole, never mixed
            self.accelerator.wait_for_everyone()
            return
        if finished:
            raise CGCValueError(
                f"output_dir={str(out)!r} already holds a finished run (metrics.json has "
                "'final'); pass overwrite_output_dir=True (--overwrite_output_dir) to replace "
                "it, or choose another output_dir."
            )
        if has_run and not args.resume_from_checkpoint:
            raise CGCValueError(
                f"output_dir={str(out)!r} holds an unfinished run; continue it with "
                "resume_from_checkpoint='latest' (--resume_from_checkpoint latest), replace it "
                "with overwrite_output_dir=True, or choose another output_dir."
            )

    # ------------------------------------------------------------------------------ training
    def train(self) -> dict[str, Any]:
        """Train to ``max_train_steps`` (or ``num_train_epochs``), evaluate, save the model.

        Returns:
            The final metrics: ``train_loss``, ``train_steps``, ``train_runtime`` and the
            ``eval_*`` metrics of the last evaluation.
        """
        from tqdm.auto import tqdm

        acc, args = self.accelerator, self.args
        resumed_from = self._resume()
        if resumed_from is None:
            set_seed(args.seed)
        acc.init_trackers("cgc_hf", config=_flat_config(self._resolved()))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._clean_partial_checkpoints()
            _write_json(self.output_dir / "args.json", self._resolved())
        state = self.state
        logger.info(
            "training %d optimizer steps (%d per epoch, %d processes)%s",
            self.max_steps,
            self.steps_per_epoch,
            acc.num_processes,
            f", resumed from {resumed_from}" if resumed_from else "",
        )
        bar = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc="train",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        unlabeled = self._unlabeled_batches()
        window = _Window()
        run_loss, run_ce, run_cgc, run_n = 0.0, 0.0, 0.0, 0
        t_start = t_log = time.perf_counter()
        images = 0
        self.model.train()
        while state.global_step < self.max_steps:
            self.train_sampler.set_epoch(state.epoch)
            self.train_loader.set_epoch(state.epoch)
            loader = self.train_loader
            if state.batch_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, state.batch_in_epoch)
                loader.set_epoch(state.epoch)
            for batch in loader:
                state.batch_in_epoch += 1
                pixel_values, labels = self._merge(batch, unlabeled)  # (B', 3, H, W), (B',)
                images += pixel_values.shape[0] * acc.num_processes
                if window.size == 0:
                    window.buffers = _float_buffers(self.model)
                with acc.accumulate(self.model), _out_of_memory_advice(args):
                    out = self.model(pixel_values, labels=labels)
                    out["loss"] = self._ramped_loss(out)
                    finite = self._all_finite(out["loss"])
                    # Backward runs even on a bad loss, so every process takes part in DDP's
                    # gradient reduction; the resulting gradients are discarded below.
                    acc.backward(out["loss"])
                    window.size += 1
                    window.finite &= finite
                    if acc.sync_gradients:
                        if window.finite:
                            if args.max_grad_norm is not None:
                                acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                            self.optimizer.step()
                            self.scheduler.step()
                        else:
                            _restore_buffers(self.model, window.buffers)
                        self.optimizer.zero_grad(set_to_none=True)
                if finite:
                    run_loss += out["loss"].item()
                    run_ce += out["loss_ce"].item()
                    run_cgc += out["loss_cgc"].item()
                    run_n += 1
                    state.loss_sum += out["loss"].item()
                    state.loss_batches += 1
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                bar.update(1)
                if window.finite:
                    state.nonfinite_in_row = 0
                else:
                    self._on_nonfinite()
                window = _Window()
                if run_n and (
                    state.global_step % args.logging_steps == 0
                    or state.global_step == self.max_steps
                ):
                    now = time.perf_counter()
                    logs = {
                        "train/loss": run_loss / run_n,
                        "train/loss_ce": run_ce / run_n,
                        "train/loss_cgc": run_cgc / run_n,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/images_per_second": images / max(now - t_log, 1e-9),
                        "train/epoch": state.epoch + state.batch_in_epoch / len(self.train_loader),
                    }
                    acc.log(logs, step=state.global_step)
                    bar.set_postfix(
                        loss=f"{logs['train/loss']:.3f}",
                        ce=f"{run_ce / run_n:.3f}",
                        cgc=f"{run_cgc / run_n:.3f}",
                        img_s=f"{logs['train/images_per_second']:.1f}",
                    )
                    run_loss, run_ce, run_cgc, run_n, images, t_log = 0.0, 0.0, 0.0, 0, 0, now
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    self._evaluate_and_record()
                if (
                    isinstance(args.checkpointing_steps, int)
                    and state.global_step % args.checkpointing_steps == 0
                ):
                    self.save_checkpoint()
                self._step_end()
                if state.global_step >= self.max_steps:
                    break
            else:  # the labeled loader is exhausted: the epoch is complete
                state.epoch += 1
                state.batch_in_epoch = 0
                if args.eval_steps is None:
                    self._evaluate_and_record()
                if args.checkpointing_steps == "epoch":
                    self.save_checkpoint()
        bar.close()
        train_loss = state.loss_sum / max(state.loss_batches, 1)
        return self._finish(train_loss, time.perf_counter() - t_start)

    def _ramped_loss(self, out: dict[str, Tensor]) -> Tensor:
        """``out["loss"]``, with the CGC term scaled by the warm-up ramp while it lasts."""
        ramp = self.args.cgc_warmup_steps
        if ramp == 0 or self.state.global_step >= ramp:
            return out["loss"]
        weight = self.state.global_step / ramp  # 0 at the first step, 1 once the ramp is done
        cgc_lambda = self.accelerator.unwrap_model(self.model).config.cgc_lambda
        return out["loss_ce"] + weight * cgc_lambda * out["loss_cgc"]

    def _step_end(self) -> None:
        """Called after every optimizer step (a seam for subclasses and fault-injection tests)."""

    def _merge(
        self, batch: dict[str, Tensor], unlabeled: Iterator[dict[str, Tensor]] | None
    ) -> tuple[Tensor, Tensor]:
        pixel_values, labels = batch["pixel_values"], batch["labels"]  # (B, 3, H, W), (B,)
        if unlabeled is None:
            return pixel_values, labels
        u = next(unlabeled)["pixel_values"].to(pixel_values.device)  # (U, 3, H, W)
        no_label = torch.full(
            (u.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
        )  # (U,)
        return torch.cat([pixel_values, u]), torch.cat([labels, no_label])  # (B + U, ...)

    def _unlabeled_batches(self) -> Iterator[dict[str, Tensor]] | None:
        """Cycle the unlabeled loader forever, independently of the labeled epochs."""
        if self.unlabeled_loader is None:
            return None

        def cycle() -> Iterator[dict[str, Tensor]]:
            state = self.state
            while True:
                self.unlabeled_sampler.set_epoch(state.unlabeled_epoch)
                self.unlabeled_sampler.start = (
                    state.unlabeled_batches * self.args.unlabeled_batch_size
                )
                for batch in self.unlabeled_loader:
                    state.unlabeled_batches += 1
                    yield batch
                state.unlabeled_epoch += 1
                state.unlabeled_batches = 0

        return cycle()

    def _all_finite(self, loss: Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # (1,)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")  # every process decides alike
        return not bool(bad.item())

    def _on_nonfinite(self) -> None:
        state, args = self.state, self.args
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        logger.warning(
            "non-finite loss at step %d: update skipped (%d in a row, %d in total; the run stops "
            "after %d in a row)",
            state.global_step,
            state.nonfinite_in_row,
            state.nonfinite_total,
            args.max_nonfinite_steps,
        )
        self.accelerator.log(
            {"train/nonfinite_steps": state.nonfinite_total}, step=state.global_step
        )
        if state.nonfinite_in_row < args.max_nonfinite_steps:
            return
        last = latest_checkpoint(self.output_dir)
        if last is None:
            # The weights are still those of the last finite step: worth keeping.
            last = self.save_checkpoint()
        self.accelerator.end_training()
        raise CGCError(
            f"training stopped: the loss was not finite for {state.nonfinite_in_row} optimizer "
            f"steps in a row (last at step {state.global_step}; max_nonfinite_steps="
            f"{args.max_nonfinite_steps}). The last good checkpoint is {last}. Check the data for "
            "NaN/inf pixels, lower learning_rate, or use mixed_precision='no', then resume with "
            f"--resume_from_checkpoint {last}."
        )

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Top-1 accuracy and explanation metrics on the eval dataset, over all processes.

        Returns:
            ``eval_accuracy`` and ``eval_pointing_game`` in percent, ``eval_consistency``
            (mean cosine), ``eval_content_heatmap`` (x100), ``eval_zero_heatmaps`` (count),
            ``eval_insertion`` / ``eval_deletion`` when enabled, ``eval_samples``.
        """
        from . import metrics as metrics_lib

        if self.eval_loader is None:
            return {}
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        # Its own generator: metrics are comparable between evaluations, and training's RNG
        # stream is the same whether or not (or how often) the run evaluates.
        generator = torch.Generator(device=acc.device).manual_seed(self.args.seed)
        gathered: dict[str, list[Tensor]] = {}
        first = None
        try:
            for batch in self.eval_loader:
                first = batch if first is None else first
                with acc.autocast():
                    per_sample = metrics_lib.evaluate_batch(
                        model,
                        batch,
                        generator=generator,
                        insertion_steps=self.args.eval_insertion_steps,
                    )  # each (B,)
                for key, value in per_sample.items():
                    value = acc.gather_for_metrics(value.detach().float())  # (B * P,) no padding
                    gathered.setdefault(key, []).append(value.cpu())
            if first is not None and self.args.figure_images and acc.is_main_process:
                self._write_figure(model, first)
        finally:
            model.train(was_training)
        values = {k: torch.cat(v) for k, v in gathered.items()}  # each (N,)
        out: dict[str, float] = {}
        for key, v in values.items():
            # NaN marks a row a metric does not apply to (e.g. accuracy of an unlabeled row).
            if key == "correct":
                out["eval_accuracy"] = 100.0 * v.nanmean().item()
            elif key == "pointing_game":
                out["eval_pointing_game"] = 100.0 * v.nanmean().item()
            elif key == "zero_heatmap":
                out["eval_zero_heatmaps"] = float(v.nansum().item())
            else:
                out[f"eval_{key}"] = v.nanmean().item()
        out["eval_samples"] = float(next(iter(values.values())).numel()) if values else 0.0
        return out

    def _evaluate_and_record(self) -> dict[str, float]:
        metrics = self.evaluate()
        if not metrics:
            return metrics
        state = self.state
        record = {"step": state.global_step, "epoch": state.epoch, **metrics}
        state.evaluations.append(record)
        self.accelerator.log(
            {k.replace("eval_", "eval/"): v for k, v in metrics.items()}, step=state.global_step
        )
        logger.info("step %d: %s", state.global_step, _fmt(metrics))
        if self.accelerator.is_main_process:
            _write_json(self.output_dir / "metrics.json", {"evaluations": state.evaluations})
        return metrics

    def _write_figure(self, model: CGCModel, batch: dict[str, Tensor]) -> None:
        """Heatmaps of the first eval images, as ``output_dir/figures/step_<N>.png``."""
        try:
            from .visualize import explanation_figure
        except ImportError:  # matplotlib is an optional dependency
            logger.info("matplotlib is not installed: no heatmap figure is written.")
            return
        import matplotlib.pyplot as plt

        path = self.output_dir / "figures" / f"step_{self.state.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = explanation_figure(
            {"CGC" if model.config.cgc_lambda > 0 else "baseline": model},
            batch,
            model.config.data_config,
            path,
            max_images=self.args.figure_images,
        )
        plt.close(fig)
        self.last_figure = path

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Save the full training state to ``output_dir/checkpoints/step_<N>``, atomically.

        The state goes to a temporary sibling directory; the ``COMPLETE`` marker (the trainer
        state as JSON) is written last, then the directory is renamed. A crash or a full disk
        at any point leaves earlier checkpoints untouched and no directory that looks complete.
        """
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if (final / COMPLETE).exists():
            return final
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                _write_json(tmp / COMPLETE, dataclasses.asdict(self.state))
                os.replace(tmp, final)
        except OSError as err:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.output_dir)
            raise CheckpointError(
                f"could not write checkpoint {final} ({err}); the previous checkpoint "
                f"{previous or '(none)'} is intact. Free disk space in {root}, then resume with "
                "--resume_from_checkpoint latest."
            ) from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._prune_checkpoints()
        logger.info("saved checkpoint %s", final)
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.args.checkpoints_total_limit
        if limit is None:
            return
        for old in complete_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old)

    def _clean_partial_checkpoints(self) -> None:
        root = self.output_dir / "checkpoints"
        if root.exists():
            for tmp in root.glob(".tmp-*"):
                logger.warning("removing incomplete checkpoint %s (interrupted while saving)", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def _resume(self) -> Path | None:
        target = self.args.resume_from_checkpoint
        if not target:
            return None
        if target == "latest":
            path = latest_checkpoint(self.output_dir)
            if path is None:
                logger.warning(
                    "resume_from_checkpoint='latest': no complete checkpoint in %s; "
                    "training from the start.",
                    self.output_dir / "checkpoints",
                )
                return None
        else:
            path = Path(target)
            if not (path / COMPLETE).exists():
                raise CheckpointError(
                    f"resume_from_checkpoint={target!r} is not a complete checkpoint (no "
                    f"{COMPLETE} marker); use 'latest' or one of "
                    f"{[str(p) for p in complete_checkpoints(self.output_dir)] or '(none)'}."
                )
        saved = json.loads((path / COMPLETE).read_text())
        self.accelerator.load_state(str(path))
        self.state = TrainerState(**saved)
        return path

    # ------------------------------------------------------------------------------ the end
    def _finish(self, train_loss: float, runtime: float) -> dict[str, Any]:
        acc, state = self.accelerator, self.state
        last = state.evaluations[-1] if state.evaluations else None
        if last is None or last["step"] != state.global_step:
            metrics = self._evaluate_and_record()
        else:
            metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
        final: dict[str, Any] = {
            "train_loss": train_loss,
            "train_steps": state.global_step,
            "train_runtime": runtime,
            "nonfinite_steps": state.nonfinite_total,
            **metrics,
        }
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.save_model(final)
            # Written last: a metrics.json with "final" marks the run as finished.
            _write_json(
                self.output_dir / "metrics.json", {"evaluations": state.evaluations, "final": final}
            )
        acc.log({f"final/{k}": v for k, v in final.items()}, step=state.global_step)
        acc.end_training()
        logger.info("final: %s", _fmt(final))
        return final

    def save_model(self, metrics: dict[str, Any] | None = None) -> Path:
        """Save the trained model to ``output_dir/model`` with ``save_pretrained``.

        The folder loads with ``CGCModel.from_pretrained``. A model that cannot describe itself
        for rebuilding (e.g. a timm instance built with unseen arguments) gets its weights saved
        as ``model.safetensors`` and its config as ``config.json`` instead, with a warning.
        """
        model = self.accelerator.unwrap_model(self.model)
        folder = self.output_dir / "model"
        numbers = {
            k: float(v)
            for k, v in (metrics or {}).items()
            if k.startswith("eval_") and isinstance(v, (int, float))
        }
        info = self.run_info
        if hasattr(model, "save_pretrained"):
            try:
                return model.save_pretrained(
                    folder,
                    metrics=numbers,
                    base_model=info.get("base_model"),
                    dataset=info.get("dataset"),
                    label_setting=info.get("label_setting"),
                    figure=getattr(self, "last_figure", None),
                )
            except CheckpointError as err:
                if isinstance(err.__cause__, OSError):
                    raise self._final_save_error(folder, err.__cause__) from err
                logger.warning("save_pretrained failed (%s); saving the bare weights.", err)
        from safetensors.torch import save_model

        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_model(model, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(model.config.to_json())
        except OSError as err:
            raise self._final_save_error(folder, err) from err
        return folder

    def _final_save_error(self, folder: Path, err: OSError) -> CheckpointError:
        previous = latest_checkpoint(self.output_dir)
        advice = (
            f"checkpoint {previous} is intact: free disk space, then rerun with "
            "--resume_from_checkpoint latest"
            if previous is not None
            else "no checkpoint was saved (set checkpointing_steps to keep one): free disk "
            "space and run again"
        )
        return CheckpointError(f"could not write the trained model to {folder} ({err}); {advice}.")

    def _resolved(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        return _without_secrets(
            {
                "training_arguments": self.args.to_dict(),
                "cgc_config": model.config.to_dict(),
                "num_processes": self.accelerator.num_processes,
                "max_train_steps": self.max_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "run": self.run_info,
            }
        )


# ---------------------------------------------------------------------------------- helpers
@dataclass
class _Window:
    """Batches accumulated towards the next optimizer step."""

    size: int = 0
    finite: bool = True
    buffers: list[Tensor] | None = None


@contextlib.contextmanager
def _out_of_memory_advice(args: TrainingArguments) -> Iterator[None]:
    """Turn running out of (device or host) memory in a step into advice, not a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise CGCMemoryError(
            f"out of memory in a training step with per_device_train_batch_size="
            f"{args.per_device_train_batch_size} and unlabeled_batch_size="
            f"{args.unlabeled_batch_size} ({type(err).__name__}). Lower the batch sizes (keep "
            "the effective batch with gradient_accumulation_steps), lower --image_size, use "
            "mixed_precision='bf16', or a smaller model."
        ) from err


def _float_buffers(model: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


def _restore_buffers(model: nn.Module, saved: list[Tensor] | None) -> None:
    """Undo what a skipped batch did to running statistics (BatchNorm sees NaN inputs too)."""
    if saved is None:
        return
    with torch.no_grad():
        for b, s in zip([b for b in model.buffers() if b.is_floating_point()], saved):
            b.copy_(s)


def _head_module(model: nn.Module) -> nn.Module | None:
    """The classifier of a CGCModel: the closed-form CAM's linear head, else the backbone's."""
    backbone = model.backbone
    name = model.target.linear_head
    if name:
        return backbone.get_submodule(name)
    if hasattr(backbone, "get_classifier"):
        return backbone.get_classifier()
    head = getattr(backbone, "classifier", None)
    return head if isinstance(head, nn.Module) else None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        step = p.name[len(CHECKPOINT_PREFIX) :]
        if p.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (p / COMPLETE).exists():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; partial (interrupted) ones are ignored."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _finished(output_dir: Path) -> bool:
    path = output_dir / "metrics.json"
    if not path.exists():
        return False
    try:
        return "final" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


def _write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _without_secrets(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_secrets(v) for k, v in d.items() if "token" not in str(k).lower()}
    if isinstance(d, (list, tuple)):
        return [_without_secrets(v) for v in d]
    return d


def _flat_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """Scalars only (TensorBoard's hparams accept nothing else)."""
    flat: dict[str, Any] = {}
    for key, value in resolved["training_arguments"].items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    cfg = resolved["cgc_config"]
    for key in (
        "cgc_lambda",
        "temperature",
        "cam_method",
        "cam_target",
        "compare_size",
        "flip_prob",
        "ce_on_augmented",
        "library",
        "architecture",
        "num_labels",
        "target_layer",
    ):
        value = cfg.get(key)
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    flat["crop_scale"] = str(cfg.get("crop_scale"))
    return flat


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
