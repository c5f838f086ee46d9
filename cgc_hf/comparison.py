"""Several models on the same images: options, column names, paired differences, the table.

Builds on :mod:`cgc_hf.evaluation`: each model's :class:`~cgc_hf.Evaluation` holds per-image
values in dataset order, so models evaluated on the same data pair up image by image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .coerce import coerce_fields
from .config import CGCTrainingArguments, option
from .errors import CGCValueError
from .evaluation import METRICS, Evaluation, Metric, paired_difference


@dataclass
class EvaluationArguments:
    """Options of an evaluation of one or more models on one dataset (``recipes/evaluate.py``).

    The data options are :class:`~cgc_hf.DataArguments`' (its reading fields and
    ``max_eval_samples``, the same seeded subset as in training); the seed and the batch size mean
    what they mean in :class:`~cgc_hf.CGCTrainingArguments`, so the training seed reproduces a
    run's ``metrics.json``.
    """

    model: str | None = option(
        None,
        "Model to evaluate: a cgc_hf folder (<finetune output_dir>/model) or Hub "
        "id, a timm name, a transformers Hub id or folder (required).",
        aliases=("--model_name_or_path",),
    )
    compare: tuple[str, ...] = option(
        (), "More models, side by side with --model (e.g. the --no_cgc baseline)."
    )
    names: tuple[str, ...] | None = option(
        None, "Column names, one per model (the folder names, made unique)."
    )
    ignore_labels: bool = option(
        False,
        "The models' classes are not the dataset's (e.g. an ImageNet classifier): "
        "skip accuracy and explain the predicted class everywhere.",
    )
    output_dir: str = option("cgc-eval", "Where JSON and PNG files go.")
    per_device_eval_batch_size: int = option(
        CGCTrainingArguments.per_device_eval_batch_size,
        "Images per device and batch (the numbers do not depend on it).",
    )
    dataloader_num_workers: int | None = option(
        None,
        "Worker processes loading the images (default: as in training, "
        "min(8, CPU cores - 1) on an accelerator, 0 on the CPU).",
    )
    insertion_steps: int = option(
        0,
        "Steps of the insertion / deletion curves, e.g. 16 (0 skips them: they cost "
        "2 * (steps + 1) forward passes per image).",
    )
    seed: int = option(
        CGCTrainingArguments.seed,
        "Seed of the consistency crops and of the data (generated images, a "
        "held-out slice): the training seed reproduces the run's metrics.",
    )
    figure_images: int = option(8, "Images in comparison.png (0: no figure).")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not self.model:
            raise CGCValueError("--model is required: the model to evaluate (a folder or an id).")
        for name, low in (
            ("per_device_eval_batch_size", 1),
            ("dataloader_num_workers", 0),
            ("insertion_steps", 0),
            ("seed", 0),
            ("figure_images", 0),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                raise CGCValueError(f"--{name} must be an integer >= {low}; got {value}.")
        refs = self.refs
        if self.names is not None and len(self.names) != len(refs):
            raise CGCValueError(
                f"--names got {len(self.names)} names for {len(refs)} models "
                f"({', '.join(refs)}); give one name per model, in the same order."
            )
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise CGCValueError(f"--names must be distinct; got {list(self.names)}.")
        if Path(self.output_dir).is_file():
            raise CGCValueError(f"--output_dir {self.output_dir!r} is a file; give a folder.")

    @property
    def refs(self) -> list[str]:
        """``model``, then the ``compare`` models."""
        return [str(self.model), *self.compare]


def column_names(refs: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """One name per model: ``names`` when given, else the shortest unique path suffix.

    finetune.py saves every run to ``<output_dir>/model``, so plain basenames would all read
    ``model``; ``cgc-output/model`` and ``cgc-baseline/model`` tell the runs apart. The same
    reference twice is numbered (``a/m``, ``a/m#2``).
    """
    if names is not None:
        return list(names)
    parts = [Path(r.rstrip("/\\")).parts or (r,) for r in refs]
    depth = [1] * len(refs)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        grow = [i for i, s in enumerate(labels) if labels.count(s) > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, s in enumerate(labels):
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            labels[i] = f"{s}#{seen[s]}"
    return labels


def folder_name(name: str) -> str:
    """A column name as one safe folder name (``cgc-run/model`` -> ``cgc-run_model``)."""
    return re.sub(r"[^\w.#-]+", "_", name).strip("._") or "model"


def compare(evaluations: Mapping[str, Evaluation]) -> dict[str, dict[str, dict[str, float]]]:
    """Paired differences of every model against the first, metric by metric.

    Returns:
        ``{name: {metric key: paired_difference}}`` for every model after the first.
    """
    names = list(evaluations)
    if not names:
        return {}
    ref = evaluations[names[0]].per_image
    return {
        name: {
            m.key: paired_difference(ref[m.key], evaluations[name].per_image[m.key], m)
            for m in METRICS
            if m.key in ref and m.key in evaluations[name].per_image
        }
        for name in names[1:]
    }


def format_table(
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
    differences: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> str:
    """A comparison as text: one column per model, one row per metric, mean +- 95% interval.

    Args:
        summaries: ``{name: Evaluation.summary()}``, the reference model first.
        differences: :func:`compare`'s output, shown as extra ``<name> - <reference>`` columns.
    """
    names = list(summaries)
    differences = differences or {}

    def cell(s: Mapping[str, float], m: Metric, signed: bool = False) -> str:
        if m.reduction == "sum":
            return f"{s['count']:+.0f}" if signed else f"{s['count']:.0f} / {s['n']}"
        sign = "+" if signed else ""
        return f"{s['mean']:{sign}.{m.digits}f} ± {s['ci95']:.{m.digits}f}"

    rows = [m for m in METRICS if any(m.key in summaries[n] for n in names)]
    header = ["metric", *names]
    lines = [
        [m.title, *(cell(summaries[n][m.key], m) if m.key in summaries[n] else "-" for n in names)]
        for m in rows
    ]
    diff_names = [n for n in names[1:] if n in differences]
    header += [f"{n} - {names[0]}" for n in diff_names]
    for line, m in zip(lines, rows):
        line += [
            cell(differences[n][m.key], m, signed=True) if m.key in differences[n] else "-"
            for n in diff_names
        ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cols: Sequence[str]) -> str:
        return "  ".join(
            [cols[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cols[1:], widths[1:]))]
        )

    rule = "-" * len(fmt(header))
    counts = {s["n"] for summary in summaries.values() for s in summary.values()}
    note = f"{max(counts, default=0)} images; mean ± 95% CI over images"
    if diff_names:
        note += f"; differences are paired (same images) against {names[0]}"
    out = [rule, fmt(header), rule, *(fmt(x) for x in lines), rule, note + "."]
    if not any(m.key == "insertion" for m in rows):
        out.append("insertion / deletion AUC skipped (insertion_steps=0; 16 steps compute them).")
    return "\n".join(out)


def write_results(
    output_dir: str | Path,
    evaluations: Mapping[str, Evaluation],
    sources: Sequence[str],
    info: Mapping[str, object],
) -> dict[str, object]:
    """Write ``<name>/metrics.json`` per model and ``comparison.json``; return the latter's data.

    Each ``metrics.json`` holds the model's summaries and its per-image values (None where a
    metric does not apply); ``comparison.json`` the summaries of every model and the paired
    differences against the first. Each file is written atomically.

    Args:
        output_dir: where the files go.
        evaluations: name -> :class:`~cgc_hf.Evaluation`, the reference model first.
        sources: what each model was loaded from, in the same order.
        info: facts recorded in both files (dataset, split, arguments...).
    """
    from ._io import write_json

    out = Path(output_dir)
    summaries = {name: e.summary() for name, e in evaluations.items()}
    names = list(evaluations)
    num_images = max((e.num_images for e in evaluations.values()), default=0)
    for name, source in zip(names, sources):
        folder = out / folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"model": name, "source": source, **info, "num_images": num_images}
        record |= {"metrics": summaries[name], "per_image": evaluations[name].per_image_lists()}
        write_json(folder / "metrics.json", record, sort_keys=False)
    comparison = {
        **info,
        "num_images": num_images,
        "models": {n: {"source": s, "metrics": summaries[n]} for n, s in zip(names, sources)},
        "differences_vs": names[0] if names else None,
        "differences": compare(evaluations),
    }
    write_json(out / "comparison.json", comparison, sort_keys=False)
    return comparison
