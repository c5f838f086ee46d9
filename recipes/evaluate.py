#!/usr/bin/env python
"""Evaluate classifiers: accuracy and explanation quality, side by side on the same images.

Any timm or transformers classifier can be audited, CGC-trained or not: top-1 accuracy, and the
consistency of its Grad-CAM (cosine between the warped heatmap and the heatmap of the warped image,
under seeded crops/flips); where the dataset has object boxes or masks, Content Heatmap (share of
the heatmap on the object), the pointing game and the number of all-zero heatmaps; with
``--insertion_steps K`` the RISE insertion / deletion AUCs. These are the numbers the trainer
writes to ``metrics.json`` and the model card, for the same model, data and seed.

Examples:
    # A CGC run against its --no_cgc baseline, on the test split of the offline default data.
    python recipes/evaluate.py --model cgc-baseline/model --compare cgc-output/model \
        --names baseline CGC --eval_split test
    # A CGC model against an off-the-shelf classifier of the same classes, on every GPU.
    accelerate launch recipes/evaluate.py --model me/resnet50-cub-cgc \
        --compare someone/resnet50-cub --dataset cub --eval_split test --insertion_steps 16
    # An ImageNet classifier's explanations of its own predictions on the same images.
    python recipes/evaluate.py --model cgc-output/model --compare resnet18 --ignore_labels

Flags: every field of ``cgc_hf.EvaluationArguments`` and the dataset-reading fields of
``cgc_hf.DataArguments`` (as in finetune.py: ``--eval_split`` defaults to the split training
evaluated on, ``--max_eval_samples`` takes the same seeded subset). Writes to ``--output_dir``:
``<name>/metrics.json`` per model (summaries and per-image values), ``comparison.json`` (all
models, paired differences against the first) and ``comparison.png`` (Grad-CAMs of every model on
the same images). Expected failures end in one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from torch.utils.data import DataLoader

# Only the public API: what this script does, a user's own script can do too.
from cgc_hf import (
    LOAD_FIELDS,
    ArgumentGroup,
    CGCArgumentParser,
    CGCDataset,
    CGCError,
    CGCValueError,
    DataArguments,
    EvaluationArguments,
    build_transform,
    collate,
    column_names,
    comparison_figures,
    evaluate,
    format_table,
    load_classifier,
    loader_options,
    write_results,
)

logger = logging.getLogger("evaluate")


def build_parser() -> CGCArgumentParser:
    return CGCArgumentParser(
        [
            ArgumentGroup("evaluation", EvaluationArguments),
            # How the dataset is read, exactly as finetune.py reads it: same classes, same split.
            ArgumentGroup("data", DataArguments, (*LOAD_FIELDS, "max_eval_samples")),
        ],
        description=__doc__.split("\n\n")[0],
    )


def run(args: EvaluationArguments, data_args: DataArguments) -> dict[str, Any]:
    """Evaluate every model; print and write the comparison. Returns comparison.json's data."""
    from accelerate import Accelerator

    # 1. Accelerate picks the device and, under `accelerate launch`, this process's share of
    #    the data and the launch config's mixed precision. Only the main process writes.
    accelerator = Accelerator()
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # progress once, not once per process

    # 2. The models first, so a mistyped folder fails before the data loads. Any classifier
    #    loads: a cgc_hf folder (offline), or a timm / transformers name, Hub id or folder.
    names = column_names(args.refs, args.names)
    models = {n: load_classifier(r, device=accelerator.device) for n, r in zip(names, args.refs)}

    # 3. The data: columns checked and labels made 0..K-1 as in training, so class indices
    #    mean what they meant there. The seed also fixes generated images and held-out slices.
    # --max_eval_samples picks the seeded subset finetune.py's flag picks. One class is enough
    # when the labels are ignored (e.g. a folder of birds with masks).
    splits = data_args.load_splits(seed=args.seed, min_classes=1 if args.ignore_labels else 2)
    rows = splits.eval
    for ref, model in zip(args.refs, models.values()):
        if model.num_labels != splits.num_labels and not args.ignore_labels:
            raise CGCValueError(
                f"model {ref!r} has num_labels={model.num_labels} but dataset "
                f"{splits.spec.name!r} has {splits.num_labels} classes; evaluate it on the dataset "
                "it was trained on, or pass --ignore_labels to audit the explanations of its own "
                "predictions."
            )

    # 4. Each model sees the images through its own data config (size, crop, mean/std), as in
    #    training. No shuffling, so per-image values line up across models (paired differences).
    datasets, evaluations = {}, {}
    for name, model in models.items():
        transform = build_transform(model.config.data_config, train=False)
        datasets[name] = CGCDataset(rows, transform, splits.spec)
        loader = DataLoader(
            datasets[name],
            batch_size=args.per_device_eval_batch_size,
            collate_fn=collate,
            # One pass per model: workers end with it.
            **{**loader_options(args, accelerator.device), "persistent_workers": False},
        )
        logger.info("evaluating %s on %d images", name, len(rows))
        # prepare() shards the loader over the processes; evaluate() gathers the values back,
        # each image once. The consistency crops are seeded per image: the same for every model.
        evaluations[name] = evaluate(
            model,
            accelerator.prepare(loader),
            accelerator,
            args.seed,
            insertion_steps=args.insertion_steps,
            use_labels=not args.ignore_labels,
        )

    # 5. Files and screen, from the main process (every process holds the same numbers).
    info = {
        "dataset": splits.spec.name,
        "split": splits.spec.eval_split or "held-out slice of train",
        "num_processes": accelerator.num_processes,
        "arguments": {"evaluation": vars(args), "data": vars(data_args)},
    }
    comparison: dict[str, Any] = {}
    if accelerator.is_main_process:
        comparison = write_results(args.output_dir, evaluations, args.refs, info)
        if args.figure_images > 0:
            try:  # matplotlib is the optional extra cgc_hf[viz]
                for path in comparison_figures(
                    models, datasets, args.output_dir, args.figure_images, splits.id2label
                ):
                    print(f"wrote {path}")
            except ImportError as err:
                logger.warning("no figure: %s", err)
        summaries = {name: e.summary() for name, e in evaluations.items()}
        print(format_table(summaries, comparison["differences"]))
        print(f"wrote {args.output_dir}/comparison.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # each process leaves the process group before it exits
    return comparison


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        args, data_args = build_parser().parse_args_into_dataclasses(argv)
        run(args, data_args)
    except CGCError as err:
        # Expected failures (missing model, unknown dataset, wrong number of classes) get one
        # line that says what to change, not a traceback.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
