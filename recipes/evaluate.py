#!/usr/bin/env python
"""Evaluate CGC models: accuracy and explanation quality, side by side on the same images.

For each model: top-1 accuracy and explanation consistency (cosine between the warped heatmap
and the heatmap of the warped image, seeded random crops/flips); where the dataset has object
boxes or masks, Content Heatmap (share of heatmap energy on the object), the pointing game and
the number of all-zero heatmaps; with ``--insertion_steps K`` the RISE insertion / deletion AUCs.

Examples:
    # A CGC run against its --no_cgc baseline, on the offline default dataset's test split.
    python recipes/evaluate.py --model cgc-output/model --compare cgc-baseline/model \
        --names CGC baseline --dataset synthetic
    # Every GPU, with insertion / deletion (2 * (K + 1) forward passes per image).
    accelerate launch recipes/evaluate.py --model me/resnet50-cub-cgc --dataset cub \
        --insertion_steps 16

Writes to ``--output_dir``: ``<name>/metrics.json`` per model (summaries and per-image values),
``comparison.json`` (all models, paired differences against the first) and ``comparison.png``
(Grad-CAMs of every model on the same images). Expected failures end in one ``error: ...`` line
and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

# Only the public API: what this script does, a user's own script can do too.
from cgc_hf import (
    CGCDataset,
    CGCError,
    CGCModel,
    CGCValueError,
    CheckpointError,
    Splits,
    build_transform,
    collate,
    evaluate_batch,
    explanation_figure,
    load_splits,
)

logger = logging.getLogger("evaluate")

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
# "org/name" as the Hub spells repository ids; anything else must be a local folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class MetricRow:
    """How one per-image metric from ``evaluate_batch`` is summarised and shown.

    Attributes:
        source: key in the dict ``evaluate_batch`` returns.
        key: key in the JSON files (the trainer's ``eval_<key>`` without the prefix).
        label: row title in the printed table.
        scale: factor applied to the per-image values (100 turns a 0/1 hit into percent).
        count: report the number of images (a sum), not a mean with an interval.
        digits: decimals shown in the table.
    """

    source: str
    key: str
    label: str
    scale: float = 1.0
    count: bool = False
    digits: int = 3


METRIC_ROWS = (
    MetricRow("correct", "accuracy", "accuracy (%)", scale=100.0, digits=2),
    MetricRow("consistency", "consistency", "consistency (cosine)"),
    MetricRow("content_heatmap", "content_heatmap", "content heatmap (%)", digits=2),
    MetricRow("pointing_game", "pointing_game", "pointing game (%)", scale=100.0, digits=2),
    MetricRow("zero_heatmap", "zero_heatmaps", "zero heatmaps (images)", count=True),
    MetricRow("insertion", "insertion", "insertion AUC (higher better)"),
    MetricRow("deletion", "deletion", "deletion AUC (lower better)"),
)


# ---------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        required=True,
        help="Folder written by save_pretrained (e.g. <finetune output_dir>/model) or Hub id.",
    )
    models.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="More models to put side by side with --model (e.g. the --no_cgc baseline).",
    )
    models.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="Column names, one per model (default: the folder names, made unique).",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        "--dataset_name",
        dest="dataset",
        default="synthetic",
        help="A named dataset (synthetic, cub, cars, ...), a Hub dataset id, an image folder or "
        "a save_to_disk directory (default: 'synthetic').",
    )
    data.add_argument(
        "--dataset_source",
        help="For a named dataset: read it from this save_to_disk copy instead of the Hub.",
    )
    data.add_argument(
        "--split",
        "--eval_split",
        dest="split",
        default="test",
        help="Split to evaluate (default: 'test'; 'validation' is what training monitored).",
    )
    data.add_argument("--image_column_name", help="Image column (default: the dataset's).")
    data.add_argument("--label_column_name", help="Label column (default: the dataset's).")
    data.add_argument(
        "--synthetic_kwargs",
        type=json.loads,
        help="JSON options of the generated dataset, as given to finetune.py.",
    )
    data.add_argument(
        "--max_eval_samples", type=int, help="Evaluate only the first N images of the split."
    )
    run = parser.add_argument_group("evaluation")
    run.add_argument("--output_dir", default="cgc-eval", help="Where JSON and PNG files go.")
    run.add_argument("--per_device_eval_batch_size", type=int, default=32)
    run.add_argument("--dataloader_num_workers", type=int, default=0)
    run.add_argument(
        "--insertion_steps",
        type=int,
        default=0,
        help="Steps of the insertion / deletion curves, e.g. 16 (default 0: skipped, they cost "
        "2 * (steps + 1) forward passes per image).",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=42,
        help="Seed of the consistency transforms and of the data (generated images, a held-out "
        "slice); use the training seed, so a held-out slice is the one training left out "
        "(default: 42, finetune.py's default).",
    )
    run.add_argument(
        "--figure_images", type=int, default=8, help="Images in comparison.png (0: no figure)."
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values before anything slow happens (loading data or models)."""
    for name, low in (
        ("per_device_eval_batch_size", 1),
        ("dataloader_num_workers", 0),
        ("insertion_steps", 0),
        ("figure_images", 0),
        ("max_eval_samples", 1),
    ):
        value = getattr(args, name)
        if value is not None and value < low:
            raise CGCValueError(f"--{name} must be an integer >= {low}; got {value}.")
    refs = [args.model, *args.compare]
    if args.names is not None and len(args.names) != len(refs):
        raise CGCValueError(
            f"--names got {len(args.names)} names for {len(refs)} models "
            f"({', '.join(refs)}); give one name per model, in the same order."
        )
    if args.names is not None and len(set(args.names)) != len(args.names):
        raise CGCValueError(f"--names must be distinct; got {args.names}.")
    for ref in refs:
        local_or_hub(ref)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CGCValueError(f"--output_dir {args.output_dir!r} is a file; give a folder.")


def local_or_hub(ref: str) -> bool:
    """True for an existing local folder, False for a Hub id; raise for a missing folder.

    Deciding here keeps a mistyped local path from becoming a Hub lookup (and, online, a
    download attempt that retries for a while before failing).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            raise CheckpointError(
                f"model {ref!r} is a training run's folder; the model is in "
                f"{str(path / 'model')!r}, pass that."
            )
        return True
    if path.exists():
        raise CheckpointError(
            f"model {ref!r} is a file; give the folder save_pretrained wrote (config.json and "
            "model.safetensors), e.g. <finetune output_dir>/model."
        )
    parent_exists = str(path.parent) not in ("", ".") and path.parent.is_dir()
    if not _HUB_ID.match(ref) or parent_exists:
        raise CheckpointError(
            f"model {ref!r}: no such directory. Give the folder save_pretrained wrote (e.g. "
            "<finetune output_dir>/model) or a Hub id 'org/name'."
        )
    return False


def column_names(refs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """Table column per model: ``--names``, else the shortest path suffix that is unique.

    finetune.py saves every run to ``<output_dir>/model``, so plain basenames would all read
    ``model``; ``cgc-output/model`` and ``cgc-baseline/model`` tell the runs apart.
    """
    if names is not None:
        return list(names)
    parts = [Path(r.rstrip("/\\")).parts or (r,) for r in refs]
    depth = [1] * len(refs)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [i for i, s in enumerate(labels) if labels.count(s) > 1]
        grow = [i for i in clashes if depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, s in enumerate(labels):  # the same model twice: number the repeats
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            labels[i] = f"{s}#{seen[s]}"
    return labels


def folder_name(name: str) -> str:
    """A column name as one safe folder name for its metrics.json."""
    return re.sub(r"[^\w.#-]+", "_", name).strip("._") or "model"


# ---------------------------------------------------------------------------------- metrics
def summarize(values: Tensor, row: MetricRow) -> dict[str, float]:
    """Mean, standard deviation and 95% interval of one metric over images.

    NaN entries (a metric that does not apply to an image, such as the accuracy of an
    unlabeled row) are left out and not counted in ``n``. The interval is the normal
    approximation ``mean +- 1.96 * std / sqrt(n)``.

    Shape:
        values: ``(N,)`` per-image values, unscaled.
    """
    v = values.double()
    v = v[~torch.isnan(v)] * row.scale  # (n,)
    n = v.numel()
    if row.count:
        return {"count": float(v.sum()) / row.scale if n else 0.0, "n": n}
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "n": 0}
    std = float(v.std()) if n > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "ci95": Z95 * std / math.sqrt(n), "n": n}


def paired_difference(a: Tensor, b: Tensor, row: MetricRow) -> dict[str, float]:
    """``b - a`` on the same images: the mean difference and its 95% interval.

    Pairing removes the between-image variance that both models share, so this interval is
    what says whether two models differ, not the overlap of their own intervals.

    Shape:
        a, b: ``(N,)`` per-image values of the same metric, same images in the same order.
    """
    if row.count:
        return {"count": summarize(b, row)["count"] - summarize(a, row)["count"]}
    keep = ~(torch.isnan(a) | torch.isnan(b))  # (N,)
    out = summarize((b - a)[keep], row)
    return {k: out[k] for k in ("mean", "ci95", "n")}


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one batch's consistency transforms: distinct per (seed, batch), non-negative."""
    return (seed * 1_000_003 + batch_index) % (2**63)


def evaluate_model(
    model: CGCModel, loader: DataLoader, accelerator: Any, args: argparse.Namespace
) -> dict[str, Tensor]:
    """Per-image metrics of one model over the whole eval split, gathered from all processes.

    Returns:
        ``evaluate_batch`` key -> ``(N,)`` float tensor on the CPU, in dataset order.
    """
    # Eval mode throughout: BatchNorm uses its running statistics and dropout is off, so the
    # numbers describe the model as it is deployed (the reference code's evaluation did not).
    model.eval()
    # Consistency draws random crops/flips from a CPU generator (the same draws on any device),
    # reseeded per batch from its index in the unsharded loader: process p's k-th batch is
    # batch k * P + p. So every model gets the same transforms on the same images (a paired
    # comparison), and the values do not depend on the number of processes (except in a final
    # batch that Accelerate pads to even out the processes).
    generator = torch.Generator()
    gathered: dict[str, list[Tensor]] = {}
    for step, batch in enumerate(loader):
        index = step * accelerator.num_processes + accelerator.process_index
        generator.manual_seed(batch_seed(args.seed, index))
        # autocast follows `accelerate launch --mixed_precision`; a no-op otherwise.
        with accelerator.autocast():
            values = evaluate_batch(
                model, batch, generator=generator, insertion_steps=args.insertion_steps
            )  # each (B,)
        # gather_for_metrics concatenates every process's rows and drops the duplicates the
        # sampler added to even out the last batch, so each image counts exactly once.
        values = accelerator.gather_for_metrics({k: v.float() for k, v in values.items()})
        for key, value in values.items():
            gathered.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in gathered.items()}  # each (N,)


# ---------------------------------------------------------------------------------- reporting
def format_table(
    names: Sequence[str],
    summaries: dict[str, dict[str, dict[str, float]]],
    differences: dict[str, dict[str, dict[str, float]]],
    num_images: int,
) -> str:
    """The comparison as text: one column per model, one row per metric, mean +- 95% CI."""

    def cell(s: dict[str, float], row: MetricRow, signed: bool = False) -> str:
        if row.count:
            return f"{s['count']:+.0f}" if signed else f"{s['count']:.0f} / {s['n']}"
        sign = "+" if signed else ""
        return f"{s['mean']:{sign}.{row.digits}f} ± {s['ci95']:.{row.digits}f}"

    rows = [r for r in METRIC_ROWS if any(r.key in summaries[n] for n in names)]
    header = ["metric", *names]
    lines = [[r.label, *(cell(summaries[n][r.key], r) for n in names)] for r in rows]
    reference = names[0]
    diff_names = [n for n in names[1:] if n in differences]
    if diff_names:
        header += [f"{n} - {reference}" for n in diff_names]
        for line, r in zip(lines, rows):
            line += [cell(differences[n][r.key], r, signed=True) for n in diff_names]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cols: Sequence[str]) -> str:
        first = cols[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cols[1:], widths[1:]))])

    rule = "-" * len(fmt(header))
    out = [rule, fmt(header), rule, *(fmt(x) for x in lines), rule]
    note = f"{num_images} images; mean ± 95% CI over images"
    if diff_names:
        note += f"; differences are paired (same images) against {reference}"
    out.append(note + ".")
    if not any(r.key in ("insertion", "deletion") for r in rows):
        out.append("insertion / deletion AUC skipped (pass --insertion_steps 16 to compute).")
    return "\n".join(out)


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _config_key(data_config: dict[str, Any]) -> str:
    return json.dumps(data_config, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every model; print and write the comparison. Returns comparison.json's data."""
    from accelerate import Accelerator

    # 1. Arguments and model references first: a typo fails now, not after loading data.
    check_args(args)
    refs = [args.model, *args.compare]
    names = column_names(refs, args.names)

    # 2. Accelerate decides the device and, under `accelerate launch`, this process's share of
    #    the data. Only the main process prints and writes files.
    accelerator = Accelerator()
    main_process = accelerator.is_main_process
    if not main_process:
        logger.setLevel(logging.WARNING)  # progress once, not once per process

    # 3. The data: columns checked and labels made 0..K-1 exactly as finetune.py does, so class
    #    indices mean the same thing as during training.
    splits: Splits = load_splits(
        args.dataset,
        image_column=args.image_column_name,
        label_column=args.label_column_name,
        eval_split=args.split,
        seed=args.seed,
        synthetic_kwargs=args.synthetic_kwargs,
        source=args.dataset_source,
    )
    eval_rows = splits.eval
    if args.max_eval_samples is not None:
        eval_rows = eval_rows.select(range(min(args.max_eval_samples, len(eval_rows))))
    logger.info(
        "dataset %r, split %r: %d images, %d classes",
        splits.spec.name, args.split, len(eval_rows), splits.num_labels,
    )  # fmt: skip

    # 4. The models: rebuilt from their saved configs (no remote code, no backbone download;
    #    a local folder never touches the network), each on this process's device.
    models: dict[str, CGCModel] = {}
    for name, ref in zip(names, refs):
        model = CGCModel.from_pretrained(
            ref, local_files_only=local_or_hub(ref), device=accelerator.device
        )
        if model.num_labels != splits.num_labels:
            raise CGCValueError(
                f"model {ref!r} has num_labels={model.num_labels} but dataset "
                f"{splits.spec.name!r} has {splits.num_labels} classes; evaluate it on the "
                "dataset it was trained on (same --synthetic_kwargs / --label_column_name)."
            )
        if model.config.id2label and model.config.id2label != splits.id2label:
            logger.warning(
                "model %r names its classes %s, the dataset %s; indices are compared as they are.",
                ref, model.config.id2label, splits.id2label,
            )  # fmt: skip
        models[name] = model

    # 5. Each model sees the images through its own data config (size, crop, mean/std), as in
    #    training; models that share a config share one loader. No shuffling, so the per-image
    #    values of different models line up for the paired differences.
    loaders: dict[str, DataLoader] = {}
    datasets: dict[str, CGCDataset] = {}
    per_image: dict[str, dict[str, Tensor]] = {}
    for name, model in models.items():
        key = _config_key(model.config.data_config)
        if key not in loaders:
            transform = build_transform(model.config.data_config, train=False)
            datasets[key] = CGCDataset(eval_rows, transform, splits.spec)
            loader = DataLoader(
                datasets[key],
                batch_size=args.per_device_eval_batch_size,
                shuffle=False,
                collate_fn=collate,
                num_workers=args.dataloader_num_workers,
            )
            # prepare() shards the loader across processes (and moves batches to the device);
            # the model is not prepared: evaluation needs no DDP wrapper.
            loaders[key] = accelerator.prepare(loader)
        logger.info("evaluating %s", name)
        per_image[name] = evaluate_model(model, loaders[key], accelerator, args)

    # 6. Summaries, and paired differences against the first model on the same images.
    summaries = {
        name: {r.key: summarize(values[r.source], r) for r in METRIC_ROWS if r.source in values}
        for name, values in per_image.items()
    }
    reference = names[0]
    differences = {
        name: {
            r.key: paired_difference(per_image[reference][r.source], per_image[name][r.source], r)
            for r in METRIC_ROWS
            if r.source in per_image[name] and r.source in per_image[reference]
        }
        for name in names[1:]
    }
    num_images = len(eval_rows)
    comparison = {
        "dataset": splits.spec.name,
        "split": args.split,
        "num_images": num_images,
        "num_processes": accelerator.num_processes,
        "models": {n: {"source": r, "metrics": summaries[n]} for n, r in zip(names, refs)},
        "differences_vs": reference,
        "differences": differences,
        "arguments": vars(args),
    }

    # 7. Files and screen: only the main process, the others hold the same gathered numbers.
    if main_process:
        out = Path(args.output_dir)
        for name, ref in zip(names, refs):
            write_json(
                out / folder_name(name) / "metrics.json",
                {
                    "model": name,
                    "source": ref,
                    "dataset": splits.spec.name,
                    "split": args.split,
                    "num_images": num_images,
                    "metrics": summaries[name],
                    "per_image": {
                        r.key: [
                            None if math.isnan(x) else x for x in per_image[name][r.source].tolist()
                        ]
                        for r in METRIC_ROWS
                        if r.source in per_image[name]
                    },
                },
            )
        write_json(out / "comparison.json", comparison)
        if args.figure_images > 0:
            write_figure(models, datasets, splits, args, out)
        print(format_table(names, summaries, differences, num_images))
        print(f"wrote {out / 'comparison.json'}")
    accelerator.wait_for_everyone()
    return comparison


def write_figure(
    models: dict[str, CGCModel],
    datasets: dict[str, CGCDataset],
    splits: Splits,
    args: argparse.Namespace,
    out: Path,
) -> None:
    """Grad-CAMs of every model on the first images of the split, as ``comparison.png``.

    The figure needs one batch of pixels for all rows, so it holds the models that share the
    first model's data config; any other model gets its own ``<name>/explanations.png``.
    """
    try:
        import matplotlib  # noqa: F401  (optional extra: pip install 'cgc_hf[viz]')
    except ImportError:
        logger.warning("matplotlib is not installed: no figure (pip install 'cgc_hf[viz]').")
        return
    groups: dict[str, dict[str, CGCModel]] = {}
    for name, model in models.items():
        groups.setdefault(_config_key(model.config.data_config), {})[name] = model
    for i, (key, group) in enumerate(groups.items()):
        dataset = datasets[key]
        count = min(args.figure_images, len(dataset))
        # The same rows for every model, taken straight from the dataset (not the sharded
        # loader), so the figure does not depend on the number of processes.
        batch = collate([dataset[j] for j in range(count)])
        if i == 0:
            path = out / "comparison.png"
        else:
            path = out / folder_name(next(iter(group))) / "explanations.png"
            logger.warning(
                "%s use another data config than %s, so their heatmaps are drawn in %s.",
                list(group), next(iter(models)), path,
            )  # fmt: skip
        data_config = next(iter(group.values())).config.data_config
        explanation_figure(
            group, batch, data_config, path, max_images=count, id2label=splits.id2label
        )
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        run(args)
    except CGCError as err:
        # Expected failures (missing model, unknown dataset, wrong number of classes) get one
        # line that says what to change, not a traceback.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
