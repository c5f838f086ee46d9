"""CGCTrainer: semi-supervised CGC fine-tuning over Hugging Face Accelerate.

One optimizer step sees a labeled batch and an unlabeled batch (labels ``-100``) concatenated:
cross-entropy uses the labeled rows, the CGC term all rows (Pillai et al., CVPR 2022, sec. 3.3).
Accelerate supplies devices, DDP, mixed precision, gradient accumulation, trackers and
checkpoint state. Data order and augmentation are pure functions of ``(seed, epoch, index)``
(:mod:`cgc_hf.sampling`), so a resumed run sees the same batches with the same augmentations;
the global RNG (restored with the checkpoint) is left to the model (CGC geometry, dropout), and
evaluation (:func:`cgc_hf.evaluation.evaluate`) seeds its crops per image from the run's seed.
Checkpoints, the run folder, the optimizer and the step guards each live in their own module of
this package.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, default_collate

from .._io import redact
from ..config import CGCTrainingArguments
from ..distributed import all_gather_rows
from ..errors import CGCValueError, CheckpointError
from ..evaluation import evaluate
from ..modeling import CGCModel
from . import fsdp, loaders
from .accelerator import make_accelerator
from .best import BestModel
from .checkpoints import CheckpointManager, TrainerState
from .figures import write_figure
from .guards import (
    NonFiniteWindow,
    all_finite,
    check_compile,
    check_negatives,
    count_nonfinite,
    is_write_error,
    nonfinite_stop,
    out_of_memory_advice,
    weights_finite,
    write_failure,
)
from .optim import build_optimizer, build_scheduler, cgc_ramp
from .progress import RunningLoss, format_metrics
from .resume import check_resume
from .run_folder import RunFolder, resolved_config, save_final_model, tracker_config
from .stream import StreamedUnlabeled, is_stream

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (every device), as the trainer does before training."""
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(seed)


class CGCTrainer:
    """Fine-tune a :class:`CGCModel` with cross-entropy + CGC, labeled and unlabeled data.

    Implements the training of Pillai et al., "Consistent Explanations by Contrastive Learning",
    CVPR 2022, on Hugging Face Accelerate (any device count, mixed precision, trackers).

    Example:
        >>> model = CGCModel.from_backbone("resnet50", num_labels=200)
        >>> args = CGCTrainingArguments(output_dir="runs/cub", num_train_epochs=30)
        >>> trainer = CGCTrainer(model, args, train_ds, eval_ds, unlabeled_dataset=pool_ds)
        >>> metrics = trainer.train()  # {"eval_accuracy": ..., "eval_content_heatmap": ...}

    Args:
        model: the model to train.
        args: run options.
        train_dataset: labeled items ``{"pixel_values": (3, H, W), "labels": int}``.
        eval_dataset: items as above, optionally with ``"mask"`` ``(H, W)`` for Content Heatmap.
        unlabeled_dataset: items with ``"pixel_values"``; their labels are ignored. May be a
            stream (``datasets.IterableDataset`` or a torch ``IterableDataset``), read in this
            process; resume then re-reads the examples used in the current pass
            (:mod:`.stream`).
        data_collator: batches a list of items (default: stack every key).
        run_info: extra JSON facts saved in ``args.json`` (dataset, split), never secrets.
    """

    def __init__(
        self,
        model: CGCModel,
        args: CGCTrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        unlabeled_dataset: Dataset | IterableDataset | None = None,
        *,
        data_collator: Callable[[list[Any]], dict[str, Tensor]] | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.collate = data_collator or default_collate
        self.run_info = redact(run_info or {})
        if len(train_dataset) == 0:
            raise CGCValueError("train_dataset is empty; it needs at least one labeled image.")
        streamed = is_stream(unlabeled_dataset)
        if unlabeled_dataset is not None and not streamed and len(unlabeled_dataset) == 0:
            unlabeled_dataset = None
        self.accelerator = acc = make_accelerator(args, self.output_dir)
        check_compile(model, acc)  # before the first step, not after a minute of compiling
        check_negatives(model, args, unlabeled_dataset is not None, acc.num_processes)
        fsdp.shard_model(model, args, acc)  # FSDP2: refuses what cannot run, shards the rest
        if acc.num_processes > 1:
            # Negatives from every process: the loss then matches one process on the full batch.
            model.set_negative_gather(all_gather_rows)

        self.images = {
            "labeled": len(train_dataset),
            "unlabeled": None if streamed else len(unlabeled_dataset or []),  # streams: uncounted
            "eval": len(eval_dataset) if eval_dataset is not None else 0,
        }
        options = loaders.loader_options(args, acc.device)
        logger.info("data loaders: %s", options)
        train, self.train_sampler = loaders.train_loader(train_dataset, self.collate, args, options)
        self.unlabeled = None
        if unlabeled_dataset is not None:
            where = (self.collate, args, acc.num_processes, acc.process_index)
            self.unlabeled = (
                StreamedUnlabeled(unlabeled_dataset, *where)
                if streamed
                else loaders.UnlabeledStream(unlabeled_dataset, *where, options)
            )
        eval_loader = None
        if eval_dataset is not None and len(eval_dataset) > 0:
            eval_loader = loaders.eval_loader(eval_dataset, self.collate, args, options)
            if (args.eval_explanation_images or math.inf) < len(eval_dataset):
                msg = "explanation metrics on the first %d of the %d evaluation images"
                logger.info(msg, args.eval_explanation_images, len(eval_dataset))

        loaders.prepare_model(model, args)  # channels_last, gradient_checkpointing
        optimizer = build_optimizer(model, args)
        self.steps_per_epoch = loaders.steps_per_epoch(len(train_dataset), args, acc.num_processes)
        self.max_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        scheduler = build_scheduler(optimizer, args, self.max_steps, acc.num_processes)
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(
            model, optimizer, train, scheduler
        )
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        self.state = TrainerState()
        self.resume_changes: dict[str, list[Any]] = {}
        self.checkpoints = CheckpointManager(self.output_dir, acc, args.checkpoints_total_limit)
        self.best = BestModel(args)
        # Last, once every argument is known to work: a bad one leaves no folder behind.
        self.run_folder = RunFolder(self.output_dir, acc)
        self.run_folder.prepare(args.overwrite_output_dir, args.resume_from_checkpoint)
        self.run_folder.release()  # taken again for the whole of train()

    # ------------------------------------------------------------------------------ training
    def train(self) -> dict[str, Any]:
        """Train to ``max_train_steps`` (or ``num_train_epochs``), evaluate, save the model.

        Returns:
            The final metrics: ``train_loss``, ``train_steps``, ``train_runtime`` and the
            ``eval_*`` metrics of the last evaluation.
        """
        self.run_folder.lock()
        try:
            return self._train()
        except Exception as err:  # a full disk shows up wherever the run writes next
            if isinstance(err, CheckpointError) or not is_write_error(err, self.output_dir):
                raise
            raise write_failure(self.output_dir, err, self.checkpoints.latest()) from err
        finally:
            self.run_folder.release()

    def _train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        acc, args = self.accelerator, self.args
        resumed_from = self._resume()
        if resumed_from is None:
            set_seed(args.seed)
        acc.init_trackers("cgc_hf", config=tracker_config(self._resolved()))
        if acc.is_main_process:
            self.checkpoints.clean_partial()
        self.run_folder.record_args(
            self._resolved(), resumed_from, self.state.global_step, self.resume_changes
        )
        state = self.state
        resumed = f", resumed from {resumed_from}" if resumed_from else ""
        msg = "training %d optimizer steps (%d per epoch, %d processes)%s"
        logger.info(msg, self.max_steps, self.steps_per_epoch, acc.num_processes, resumed)
        bar = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc="train",
            disable=not acc.is_local_main_process,
        )
        unlabeled = self.unlabeled.batches(state) if self.unlabeled is not None else None
        model = acc.unwrap_model(self.model)
        window = None
        self._running = RunningLoss()
        t_start = time.perf_counter()
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
                pixel_values, labels = loaders.merge(batch, unlabeled, loaders.memory_format(args))
                self._running.images += pixel_values.shape[0] * acc.num_processes
                window = window or NonFiniteWindow(self.model)
                model.cgc_weight = cgc_ramp(state.global_step, args.cgc_warmup_steps)
                with acc.accumulate(self.model), out_of_memory_advice(args):
                    out = self.model(pixel_values, labels=labels)
                    finite = all_finite(out["loss"], acc)
                    # Backward runs even on a bad loss, so every process takes part in DDP's
                    # gradient reduction; the resulting gradients are discarded below.
                    acc.backward(out["loss"])
                    window.add(finite)
                    if acc.sync_gradients:
                        if window.finite:
                            if args.max_grad_norm is not None:
                                acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                            self.optimizer.step()
                            self.scheduler.step()
                        else:
                            window.restore()
                        self.optimizer.zero_grad(set_to_none=True)
                if finite:
                    self._running.add(out)
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
                window = None
                self._after_step(bar)
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

    def _after_step(self, bar: Any) -> None:
        """Log, evaluate and checkpoint after an optimizer step, as the arguments ask."""
        args, state, run = self.args, self.state, self._running
        if run.batches and (
            state.global_step % args.logging_steps == 0 or state.global_step == self.max_steps
        ):
            logs = run.logs(self.scheduler.get_last_lr()[0])
            logs["train/epoch"] = state.epoch + state.batch_in_epoch / len(self.train_loader)
            self.accelerator.log(logs, step=state.global_step)
            bar.set_postfix(
                loss=f"{logs['train/loss']:.3f}",
                ce=f"{logs['train/loss_ce']:.3f}",
                cgc=f"{logs['train/loss_cgc']:.3f}",
                img_s=f"{logs['train/images_per_second']:.1f}",
            )
            self._running = RunningLoss()
        if args.eval_steps and state.global_step % args.eval_steps == 0:
            self._evaluate_and_record()
        if (
            isinstance(args.checkpointing_steps, int)
            and state.global_step % args.checkpointing_steps == 0
        ):
            self.save_checkpoint()
        self._step_end()

    def _step_end(self) -> None:
        """Called after every optimizer step (a seam for subclasses and fault-injection tests)."""

    def _on_nonfinite(self) -> None:
        state, args = self.state, self.args
        count_nonfinite(state, args, self.accelerator)
        if state.nonfinite_in_row < args.max_nonfinite_steps:
            return
        last = self.checkpoints.last_good()
        if last is None and weights_finite(self.accelerator.unwrap_model(self.model)):
            last = self.save_checkpoint()  # the weights of the last finite step: worth keeping
        self.accelerator.end_training()
        raise nonfinite_stop(state.nonfinite_in_row, state.global_step, args, last)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """``eval_<key>`` per metric of :data:`cgc_hf.evaluation.METRICS`, and ``eval_samples``.

        Runs :func:`cgc_hf.evaluation.evaluate` with the run's seed, so ``recipes/evaluate.py``
        reports the same numbers for the saved model on the same data and seed (on every image
        with ``eval_explanation_images=None``; else on those first images).
        """
        if self.eval_loader is None:
            return {}
        acc, args = self.accelerator, self.args
        model = acc.unwrap_model(self.model)
        steps, first = args.eval_insertion_steps, args.eval_explanation_images
        result = evaluate(
            model, self.eval_loader, acc, args.seed, insertion_steps=steps, explain_images=first
        )
        images = args.figure_images
        if images and acc.is_main_process:
            data, step = self.eval_loader.dataset, self.state.global_step
            figure = write_figure(acc, model, data, self.collate, images, self.output_dir, step)
            self.last_figure = figure or getattr(self, "last_figure", None)
        return result.scalars()

    def _evaluate_and_record(self) -> dict[str, float]:
        metrics = self.evaluate()
        if not metrics:
            return metrics
        state = self.state
        state.evaluations.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        self.accelerator.log(
            {k.replace("eval_", "eval/"): v for k, v in metrics.items()}, step=state.global_step
        )
        logger.info("step %d: %s", state.global_step, format_metrics(metrics))
        self.run_folder.write_metrics(state.evaluations)
        if self.best.update(state, metrics) and self.best.keep:
            self.checkpoints.keep = self.save_checkpoint()
        return metrics

    # ------------------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        """Save the full training state to ``output_dir/checkpoints/step_<N>``, atomically."""
        model = self.accelerator.unwrap_model(self.model)
        return self.checkpoints.save(self.state, model, self._resolved())

    def _resume(self) -> Path | None:
        """Verify, compare and load the checkpoint ``resume_from_checkpoint`` names."""
        target = self.args.resume_from_checkpoint
        path = self.checkpoints.find(target) if target else None
        if path is not None:
            saved = self.checkpoints.run_config(path)
            allow = self.args.allow_config_change
            self.resume_changes = check_resume(saved, self._resolved(), path, allow)
            self.state = self.checkpoints.load(path)
            if self.best.keep:
                self.checkpoints.keep = self.best.checkpoint(self.state, self.checkpoints.root)
        return path

    def _finish(self, train_loss: float, runtime: float) -> dict[str, Any]:
        acc, state = self.accelerator, self.state
        last = state.evaluations[-1] if state.evaluations else None
        if last is None or last["step"] != state.global_step:
            metrics = self._evaluate_and_record()
        else:
            metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
        if self.best.keep and state.best_step not in (None, state.global_step):
            model = acc.unwrap_model(self.model)
            best = self.best.load(model, state, self.checkpoints.root, acc.device)
            metrics = {k: v for k, v in best.items() if k.startswith("eval_")}
        final: dict[str, Any] = {
            **({"best_step": state.best_step} if self.best.key else {}),
            "train_loss": train_loss,
            "train_steps": state.global_step,
            "train_runtime": runtime,
            "nonfinite_steps": state.nonfinite_total,
            **metrics,
        }
        model = fsdp.full_model(self.model, acc)  # every process: waits for all, FSDP gathers
        if acc.is_main_process:
            self.save_model(final, model)
            # Written last: a metrics.json with "final" marks the run as finished.
            self.run_folder.write_metrics(state.evaluations, final)
        acc.log({f"final/{k}": v for k, v in final.items()}, step=state.global_step)
        acc.end_training()
        logger.info("final: %s", format_metrics(final))
        return final

    def save_model(self, metrics: dict[str, Any] | None = None, model: Any = None) -> Path:
        """Save the trained model to ``output_dir/model`` (loads with ``from_pretrained``)."""
        model = model or fsdp.full_model(self.model, self.accelerator, wait=False)  # FSDP: all call
        figure, latest = getattr(self, "last_figure", None), self.checkpoints.latest()
        out = self.output_dir / "model"
        return save_final_model(model, out, metrics or {}, self.run_info, figure, latest)

    def _resolved(self) -> dict[str, Any]:
        model, n = self.accelerator.unwrap_model(self.model), self.accelerator.num_processes
        return resolved_config(
            self.args, model, n, self.max_steps, self.steps_per_epoch, self.images, self.run_info
        )
