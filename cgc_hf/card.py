"""Model card (README.md) of a saved CGC model: Hub metadata, setting, results, usage, citation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from .backbones import ADAPTERS
from .config import METHOD_FIELDS, CGCConfig
from .errors import CGCTypeError
from .evaluation import PREFIX, SAMPLES, metric

CITATION = """\
@inproceedings{pillai2022consistent,
  title     = {Consistent Explanations by Contrastive Learning},
  author    = {Pillai, Vipin and Koohpayegani, Soroush Abbasi and Ouligian, Ashley and
               Fong, Dennis and Pirsiavash, Hamed},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern
               Recognition (CVPR)},
  year      = {2022},
  eprint    = {2110.00527},
  archivePrefix = {arXiv}
}"""

BASE_TAGS = ("cgc", "grad-cam", "explainability", "image-classification")

_PLACEHOLDER = "<repo_id_or_dir>"


def model_card(
    config: CGCConfig,
    *,
    base_model: str | None = None,
    dataset: str | None = None,
    label_setting: str | None = None,
    metrics: dict[str, float] | None = None,
    figure: str | Path | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """Write the README.md of a saved model: YAML front matter the Hub reads, then the card.

    Args:
        config: the model's :class:`CGCConfig` (backbone, labels, CGC options).
        base_model: Hub id of the checkpoint that was fine-tuned (front matter ``base_model``).
        dataset: dataset name or Hub id it was fine-tuned on (front matter ``datasets``).
        label_setting: how many labels training saw, e.g. ``"10 labels per class"``.
        metrics: evaluation results, ``{name: value}``; keys of
            :data:`cgc_hf.evaluation.METRICS` (``"accuracy"``, or the trainer's
            ``"eval_content_heatmap"``) are shown with that table's label and unit.
        figure: heatmap figure; the card links its file name, so the caller copies the file
            next to README.md (:meth:`CGCModel.save_pretrained` does).
        repo_id: Hub id used in the usage snippets (a placeholder when omitted).
        license: license of the weights (front matter ``license``), e.g. the pretrained
            config's.

    Returns:
        The markdown text, starting with ``---`` front matter.

    Example:
        >>> text = model_card(model.config, dataset="cub", metrics={"accuracy": 0.81})
        >>> text.splitlines()[0]
        '---'
    """
    if not isinstance(config, CGCConfig):
        raise CGCTypeError(
            f"config must be a CGCConfig (model.config); got {type(config).__name__}."
        )
    metrics = dict(metrics or {})
    library = config.library or "unknown"
    arch = config.architecture or "unknown architecture"
    title = f"{arch} fine-tuned with Contrastive Grad-CAM Consistency"
    data = ModelCardData(
        library_name="cgc_hf",
        pipeline_tag="image-classification",
        tags=[*BASE_TAGS, library] if config.library else list(BASE_TAGS),
        base_model=base_model,
        license=license,
        datasets=[dataset] if dataset and _is_hub_id(dataset) else None,
        model_name=title if metrics and dataset else None,
        eval_results=_eval_results(metrics, dataset),
    )
    sections = [
        f"---\n{data.to_yaml()}\n---",
        f"# {title}",
        _summary(config, base_model, dataset, label_setting),
        _setting_table(config, base_model, dataset, label_setting),
        "## CGC options\n\n" + _table(("option", "value"), _method_rows(config)),
        _results(metrics),
    ]
    if figure is not None:
        name = Path(figure).name
        sections.append(
            "## Heatmaps\n\n"
            f"![Grad-CAM heatmaps of the fine-tuned model]({name})\n\n"
            f"Grad-CAM of the explained layer `{_target_name(config)}`."
        )
    sections += [
        _usage(config, repo_id or _PLACEHOLDER),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _summary(
    config: CGCConfig, base_model: str | None, dataset: str | None, label_setting: str | None
) -> str:
    start = f"`{config.architecture}` ({config.library})"
    if base_model:
        start += f", starting from [`{base_model}`](https://huggingface.co/{base_model})"
    on = f" on {dataset}" if dataset else ""
    labels = f" with {label_setting}" if label_setting else ""
    return (
        f"{start}, fine-tuned{on}{labels} with Contrastive Grad-CAM Consistency (CGC; Pillai et "
        "al., CVPR 2022). Besides cross-entropy on labeled images, CGC trains the Grad-CAM "
        "heatmap to move with the image: for a random crop/flip T, the heatmap of T(x) should "
        "match T applied to the heatmap of x. An InfoNCE loss over heatmaps, with other images' "
        "heatmaps as negatives, rules out the trivial constant heatmap. Unlabeled images "
        "contribute to this term too, since it explains the predicted class."
    )


def _setting_table(
    config: CGCConfig, base_model: str | None, dataset: str | None, label_setting: str | None
) -> str:
    data_config = config.data_config or {}
    size = data_config.get("input_size")
    rows = [
        ("base model", f"`{base_model}`" if base_model else "not recorded"),
        ("backbone library", config.library),
        ("architecture", f"`{config.architecture}`"),
        ("dataset", dataset or "not recorded"),
        ("label setting", label_setting or "not recorded"),
        ("classes", config.num_labels),
        ("explained layer", f"`{_target_name(config)}`"),
        ("input size", "x".join(str(s) for s in size[-2:]) if size else "not recorded"),
        ("mean / std", f"{_fmt(data_config.get('mean'))} / {_fmt(data_config.get('std'))}"),
    ]
    text = "## Training setting\n\n" + _table(("", ""), rows)
    if config.id2label:
        names = [config.id2label[k] for k in sorted(config.id2label)]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        text += f"\n\nClasses: {shown}."
    return text


def _method_rows(config: CGCConfig) -> list[tuple[str, Any]]:
    return [(f"`{name}`", _fmt(getattr(config, name))) for name in METHOD_FIELDS]


def _results(metrics: dict[str, float]) -> str:
    if not metrics:
        return "## Evaluation\n\nNo evaluation results were recorded with this model."
    rows = [(_metric_name(k), _fmt(v)) for k, v in metrics.items()]
    return "## Evaluation\n\n" + _table(("metric", "value"), rows)


def _eval_results(metrics: dict[str, float], dataset: str | None) -> list[EvalResult] | None:
    if not metrics or not dataset:
        return None  # the Hub's model-index needs a dataset to attach results to
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=_metric_key(key),
            metric_value=float(value),
            metric_name=_metric_name(key),
        )
        for key, value in metrics.items()
        # The number of images is context for the table, not a result to rank models by.
        if isinstance(value, (int, float))
        and math.isfinite(float(value))
        and _metric_key(key) != SAMPLES
    ] or None


def _usage(config: CGCConfig, repo_id: str) -> str:
    size = (config.data_config or {}).get("input_size", [3, 224, 224])
    h, w = size[-2:]
    cgc = f"""\
```python
import torch
from cgc_hf import CGCModel

model = CGCModel.from_pretrained("{repo_id}")  # rebuilds the architecture offline, strict load
pixel_values = torch.randn(1, 3, {h}, {w})  # normalise with model.config.data_config
logits = model(pixel_values)["logits"]  # (1, {config.num_labels})
heatmaps = model.explain(pixel_values, size=({h}, {w}))  # (1, {h}, {w}) Grad-CAM
```"""
    plain = ADAPTERS.get(config.library or "", ADAPTERS["transformers"]).export_usage
    return (
        "## Usage\n\nWith cgc_hf (`pip install cgc_hf`):\n\n"
        + cgc
        + f"\n\nThe fine-tuned classifier also exports to plain {config.library}, so it runs "
        "without cgc_hf:\n\n" + plain
    )


def _is_hub_id(name: str) -> bool:
    """``org/name``, which the Hub's ``datasets:`` metadata links; not a path or a short name."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).expanduser().exists()


def _target_name(config: CGCConfig) -> str:
    if config.target and config.target.get("name"):
        return str(config.target["name"])
    return config.target_layer or "automatic"


def _metric_key(key: str) -> str:
    return key.removeprefix(PREFIX)


def _metric_name(key: str) -> str:
    """The title :data:`cgc_hf.evaluation.METRICS` gives the metric; other keys as written."""
    known = metric(key)
    if known is not None:
        return known.title
    base = _metric_key(key)
    return "Evaluated images" if base == SAMPLES else base.replace("_", " ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _table(header: tuple[str, str], rows: list[tuple[Any, Any]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)
