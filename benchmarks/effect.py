"""What CGC buys: accuracy and explanation quality on the offline default dataset, over seeds.

Each setting is trained with ``recipes/finetune.py`` (the same command a user types; settings
from ``recipes/configs/synthetic.yaml``, which were chosen on the validation split), then
evaluated on the held-out ``test`` split with ``recipes/evaluate.py``. The table gives mean +/- std
over seeds of top-1 accuracy, consistency, Content Heatmap, pointing game and all-zero heatmaps.

Settings (``--groups``):
  full   all training labels: CGC vs ``--no_cgc``
  few    K labels per class (``--labels_per_class``): CGC with the rest as unlabeled data, CGC on
         the labeled images only, and ``--no_cgc``; same number of optimizer steps as ``full``
Models (``--models``): ``cnn`` (the default narrow ResNet) and ``vit`` (a class-token ViT).

Usage:
    python benchmarks/effect.py --seeds 0 1 2 --jobs 2 --out effect-runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIT = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3}
MODELS = {
    "cnn": [],
    "vit": ["--model", "vit_tiny_patch16_224", "--model_kwargs", json.dumps(VIT)],
}
METRICS = ("accuracy", "consistency", "content_heatmap", "pointing_game")


def settings(groups: list[str], labels_per_class: list[int], steps: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if "full" in groups:
        out["full labels, CGC"] = []
        out["full labels, no CGC"] = ["--no_cgc"]
    for k in labels_per_class if "few" in groups else []:
        few = ["--labels_per_class", str(k), "--max_train_steps", str(steps)]
        out[f"{k}/class, CGC + unlabeled"] = few
        out[f"{k}/class, CGC labeled only"] = [*few, "--unlabeled", "none"]
        out[f"{k}/class, no CGC"] = [*few, "--no_cgc", "--unlabeled", "none"]
    return out


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)


def one(out: Path, model: str, name: str, extra: list[str], seed: int) -> dict[str, float]:
    tag = f"{model}-{name.replace(' ', '').replace(',', '-').replace('/', 'per')}-s{seed}"
    run_dir = out / tag
    result = run_dir / "test_eval" / "comparison.json"
    if not result.exists():  # finished runs are reused, so the script can be resumed
        run(
            [sys.executable, "recipes/finetune.py", *MODELS[model], *extra, "--seed", str(seed),
             "--output_dir", str(run_dir), "--overwrite_output_dir", "--figure_images", "0"],
            out / f"{tag}.train.log",
        )  # fmt: skip
        run(
            [sys.executable, "recipes/evaluate.py", "--model", str(run_dir / "model"),
             "--dataset", "synthetic", "--split", "test", "--output_dir",
             str(run_dir / "test_eval"), "--figure_images", "0", "--seed", str(seed)],
            out / f"{tag}.eval.log",
        )  # fmt: skip
    metrics = next(iter(json.loads(result.read_text())["models"].values()))["metrics"]
    row = {k: metrics[k]["mean"] for k in METRICS if k in metrics}
    row["zero_heatmaps"] = metrics["zero_heatmaps"]["count"] / metrics["zero_heatmaps"]["n"] * 100
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=list(MODELS))
    p.add_argument("--groups", nargs="+", default=["full", "few"], choices=["full", "few"])
    p.add_argument("--labels_per_class", nargs="+", type=int, default=[5, 20])
    p.add_argument("--few_steps", type=int, default=250, help="optimizer steps of few-label runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default="effect-runs")
    p.add_argument("--only", nargs="*", default=None, help="models for the few-label group")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for model in args.models:
        groups = args.groups if args.only is None or model in args.only else ["full"]
        for name, extra in settings(groups, args.labels_per_class, args.few_steps).items():
            for seed in args.seeds:
                jobs.append((model, name, extra, seed))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: (j[0], j[1], one(out, *j)), jobs))
    table: dict[tuple[str, str], list[dict[str, float]]] = {}
    for model, name, row in rows:
        table.setdefault((model, name), []).append(row)
    keys = [*METRICS, "zero_heatmaps"]
    print(f"test split, mean +/- std over seeds {args.seeds}")
    print("| model | setting | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (model, name), runs in table.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in runs if k in r]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            fmt = ".3f" if k == "consistency" else ".1f"
            cells.append(f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}")
        print(f"| {model} | {name} | " + " | ".join(cells) + " |")
    (out / "effect.json").write_text(json.dumps({f"{m}|{n}": r for (m, n), r in table.items()}))


if __name__ == "__main__":
    main()
