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
    # The same from an installed package (pip install cgc_hf): the console script.
    cgc-finetune --model resnet50 --dataset cub --label_fraction 0.1

Flags follow transformers' image-classification example: each is a field of the argument
dataclasses below; ``--config file.yaml`` (else ``recipes/configs/<dataset>.yaml``) sets
defaults under them. Lines marked ``# CGC`` are what this adds to plain fine-tuning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

# Only the public API: what this script does, a user's own script can do too.
from cgc_hf import (
    METHOD_FIELDS,
    METRICS,
    ArgumentGroup,
    CGCArgumentParser,
    CGCConfig,
    CGCError,
    CGCModel,
    CGCTrainer,
    CGCTrainingArguments,
    DataArguments,
    HubArguments,
    ModelArguments,
    collate,
    set_seed,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "resnet10t"  # without a config; configs/synthetic.yaml picks tf_efficientnet_lite0
SYNTHETIC_IMAGE_SIZE = 64  # the generated images' side; no point in upsampling them


def build_parser() -> CGCArgumentParser:
    """One flag per field of the argument dataclasses, grouped as in ``--help``."""
    groups = [
        ArgumentGroup("model", ModelArguments),
        ArgumentGroup("data", DataArguments),
        ArgumentGroup("CGC method", CGCConfig, METHOD_FIELDS),  # CGC
        ArgumentGroup("training", CGCTrainingArguments),
        ArgumentGroup("Hugging Face Hub", HubArguments),
    ]
    return CGCArgumentParser(groups, default_config=dataset_config, description=__doc__)


def dataset_config(cli: dict[str, Any]) -> Path | None:
    """``configs/<dataset>.yaml``, the dataset's recommended settings, when there is one."""
    path = CONFIG_DIR / f"{cli.get('dataset_name', DataArguments.dataset_name)}.yaml"
    return path if path.exists() else None


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line over YAML defaults, as one flat dict of typed values."""
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    options = parser.parse_options(argv)
    other_model = cli.get("model_name_or_path", options.get("model_name_or_path"))
    if options["config"]:
        if other_model != parser.read_yaml(Path(options["config"])).get("model_name_or_path"):
            # The file's constructor arguments and weights describe the file's model, not the
            # one asked for.
            for key in ("model_kwargs", "pretrained_weights"):
                if key not in cli:
                    options.pop(key, None)
    return parser.typed(options)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    # 1. Arguments first: every value is typed and checked now, not after a download.
    parser = build_parser()
    options = parse_args(argv)
    model_args, data_args, method_config, args, hub = parser.build(options)
    method = {name: getattr(method_config, name) for name in METHOD_FIELDS}  # CGC
    if model_args.no_cgc:
        method["cgc_lambda"] = 0.0  # the baseline: same pipeline, cross-entropy only
    synthetic = data_args.dataset_name == "synthetic"
    repo_id, hub_api = hub.hub_model_id or Path(args.output_dir).name, None
    if hub.push_to_hub:  # a bad token or no network is found now, not after training
        repo_id, hub_api = CGCModel.create_hub_repo(repo_id, hub.hub_private_repo, hub.token)
    set_seed(args.seed)  # before the model is built: its random initialisation repeats too

    # 2. Data: columns are checked and labels made 0..K-1 before the model is sized to them.
    splits = data_args.load_splits(seed=args.seed, cache_dir=model_args.cache_dir)

    # 3. Model: any timm / transformers classifier, with its head sized to this dataset.
    pretrained = model_args.pretrained if model_args.pretrained is not None else not synthetic
    model_name = model_args.model_name_or_path or DEFAULT_MODEL
    model = CGCModel.from_backbone(
        model_name,
        num_labels=splits.num_labels,
        id2label=splits.id2label,
        pretrained=pretrained,
        target_layer=model_args.target_layer,  # CGC: the layer Grad-CAM explains
        model_kwargs=model_args.model_kwargs,
        pretrained_weights=model_args.pretrained_weights,
        input_size=model_args.image_size or (SYNTHETIC_IMAGE_SIZE if synthetic else None),
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
        token=hub.token,  # for the download only; the trainer never writes it
        **method,  # CGC
    )

    # 4. Labeled / unlabeled / eval datasets, with transforms from the model's data config.
    data = data_args.build_datasets(splits, model.config.data_config, seed=args.seed)

    # 5. The trainer: Accelerate handles devices, processes, precision, logging, checkpoints.
    run_info = {
        "dataset": data_args.dataset_name,
        "base_model": model_name,
        "pretrained": pretrained or model_args.pretrained_weights is not None,
        "label_setting": data.label_setting,
        "labeled_images": len(data.labeled),
        "unlabeled_images": len(data.unlabeled) if data.unlabeled is not None else 0,  # CGC
        "config_file": options["config"],
        "command_line": argv if argv is not None else sys.argv[1:],  # the trainer redacts it
        "options": parser.resolved([model_args, data_args, method_config, args, hub]),
    }
    trainer = CGCTrainer(
        model,
        args,
        data.labeled,
        data.eval,
        unlabeled_dataset=data.unlabeled,  # CGC: unlabeled rows train the heatmaps only
        data_collator=collate,
        run_info=run_info,
    )
    if trainer.accelerator.is_main_process:
        data.save_split(Path(args.output_dir) / "split.json", {"seed": args.seed})
    metrics = trainer.train()
    if data.bad_images:
        metrics["bad_images"] = data.bad_images

    # 6. Report, and share if asked: the upload is output_dir/model (weights, config, card).
    if trainer.accelerator.is_main_process:
        print_summary(metrics, args.output_dir, model.config.cgc_lambda)
        if hub.push_to_hub:  # the saved copy: under FSDP the model in memory is sharded
            shared = CGCModel.from_pretrained(Path(args.output_dir) / "model")
            info = shared.push_to_hub(
                repo_id,
                hub_api=hub_api,
                private=hub.hub_private_repo,
                token=hub.token,
                metrics={k: v for k, v in metrics.items() if k.startswith("eval_")},
                dataset=data_args.dataset_name,
                label_setting=data.label_setting,
                figure=getattr(trainer, "last_figure", None),
            )
            print(f"pushed to the Hub: {getattr(info, 'commit_url', None) or info}")
    return metrics


def print_summary(metrics: dict[str, Any], output_dir: str, cgc_lambda: float) -> None:
    print(f"\n{'CGC' if cgc_lambda > 0 else 'baseline (no CGC)'} run finished: {output_dir}")
    for m in METRICS:  # the names recipes/evaluate.py and the model card use
        if f"eval_{m.key}" in metrics:
            print(f"  {m.title:<30} {metrics[f'eval_{m.key}']:.{m.digits}f}")
    if metrics.get("bad_images"):
        print(f"  skipped {metrics['bad_images']} unreadable images (--on_bad_image skip)")


def cli() -> int:
    """The ``cgc-finetune`` console script: :func:`main` with expected failures as one line."""
    try:
        main()
    except CGCError as err:
        # Expected failures (bad input, no network, full disk) get one line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
