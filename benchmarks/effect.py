"""What CGC buys: accuracy and explanation quality on the offline default dataset, paired by seed.

Each run is ``recipes/finetune.py`` with a config file (default ``recipes/configs/synthetic.yaml``:
ImageNet-pretrained ``tf_efficientnet_lite0`` fine-tuned on photo-backed shapes with a spurious
corner cue; settings chosen on the validation split), evaluated on the held-out ``test`` split with
``recipes/evaluate.py``. Every CGC run has a baseline (``--no_cgc``, labeled images only) with the
same seed, hence the same data, split and steps; the table gives each metric's mean over seeds for
both and the paired difference (CGC - baseline) with a 95% interval over seeds (Student t).

Settings (``--groups``):
  full    all training labels: CGC vs the baseline (paper: accuracy comparable, explanations better)
  pool    K labels per class (``--labels_per_class``), CGC also on the other training images as an
          unlabeled pool (paper: accuracy higher)
  nopool  K labels per class, CGC on the labeled images only (CGC as a regulariser)
Extra flags after ``--`` go to every finetune.py run (e.g. an ablation: ``-- --cgc_lambda 1``).

Usage:
    python benchmarks/effect.py --seeds 0 1 2 --labels_per_class 5 10 30 --jobs 2
    python benchmarks/effect.py --config recipes/configs/synthetic_scratch.yaml --out effect-scratch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "consistency", "content_heatmap", "pointing_game")
# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def settings(groups: list[str], labels_per_class: list[int]) -> dict[str, tuple[list, list]]:
    """``{name: (CGC run's flags, baseline run's flags)}``."""
    out = {}
    if "full" in groups:
        out["full labels"] = (["--unlabeled", "none"], ["--no_cgc", "--unlabeled", "none"])
    for k in labels_per_class:
        few = ["--labels_per_class", str(k)]
        base = [*few, "--no_cgc", "--unlabeled", "none"]
        if "pool" in groups:
            out[f"{k}/class + unlabeled pool"] = (few, base)
        if "nopool" in groups:
            out[f"{k}/class, no pool"] = ([*few, "--unlabeled", "none"], base)
    return out


def _run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True, cwd=ROOT)


def _tag(flags: list[str], seed: int) -> str:
    text = "-".join(f.lstrip("-") for f in flags) or "cgc"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) + f"-s{seed}"


def one(out: Path, config: str, flags: list[str], seed: int, synthetic_kwargs) -> dict:
    """Train (or reuse) one run and evaluate it on the test split; its metrics by key."""
    run_dir = out / _tag(flags, seed)
    result = run_dir / "test_eval" / "comparison.json"
    if not (run_dir / "model" / "config.json").exists():  # finished runs are reused
        _run(
            [sys.executable, "recipes/finetune.py", "--config", config, *flags,
             "--seed", str(seed), "--output_dir", str(run_dir), "--overwrite_output_dir",
             "--figure_images", "0"],
            out / f"{run_dir.name}.train.log",
        )  # fmt: skip
    if not result.exists():
        evaluate = [sys.executable, "recipes/evaluate.py", "--model", str(run_dir / "model"),
                    "--dataset", "synthetic", "--eval_split", "test", "--seed", str(seed),
                    "--output_dir", str(run_dir / "test_eval"), "--figure_images", "0"]  # fmt: skip
        if synthetic_kwargs:
            evaluate += ["--synthetic_kwargs", json.dumps(synthetic_kwargs)]
        _run(evaluate, out / f"{run_dir.name}.eval.log")
    metrics = next(iter(json.loads(result.read_text())["models"].values()))["metrics"]
    return {k: metrics[k]["mean"] for k in METRICS if k in metrics}


def interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student t over seeds) of paired differences."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    t = T95.get(len(diffs) - 1, 1.96)
    return mean, t * statistics.stdev(diffs) / math.sqrt(len(diffs))


def table(results: dict, seeds: list[int]) -> str:
    """Markdown rows: per setting, CGC and baseline means and the paired difference."""
    lines = [
        "| setting | metric | CGC | baseline | CGC - baseline (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for name, pairs in results.items():
        for k in METRICS:
            if not all(k in c and k in b for c, b in pairs):
                continue
            fmt = ".3f" if k == "consistency" else ".1f"
            cgc = statistics.mean(c[k] for c, _ in pairs)
            base = statistics.mean(b[k] for _, b in pairs)
            mean, half = interval([c[k] - b[k] for c, b in pairs])
            lines.append(
                f"| {name} | {k} | {cgc:{fmt}} | {base:{fmt}} | {mean:+{fmt}} ± {half:{fmt}} |"
            )
    return f"test split, {len(seeds)} seeds {seeds}, paired by seed\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="recipes/configs/synthetic.yaml")
    p.add_argument("--groups", nargs="+", default=["full", "pool", "nopool"],
                   choices=["full", "pool", "nopool"])  # fmt: skip
    p.add_argument("--labels_per_class", nargs="+", type=int, default=[5, 10, 30])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default="effect-runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    synthetic_kwargs = (yaml.safe_load(Path(args.config).read_text()) or {}).get("synthetic_kwargs")
    named = settings(args.groups, args.labels_per_class)
    runs = sorted({tuple([*f, *extra]) for pair in named.values() for f in pair})
    jobs = [(list(flags), seed) for flags in runs for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(
            zip(
                [(tuple(f), s) for f, s in jobs],
                pool.map(lambda j: one(out, args.config, j[0], j[1], synthetic_kwargs), jobs),
            )
        )
    results = {
        name: [(done[(tuple([*c, *extra]), s)], done[(tuple([*b, *extra]), s)]) for s in args.seeds]
        for name, (c, b) in named.items()
    }
    text = table(results, args.seeds)
    print(text)
    (out / "effect.md").write_text(text + "\n")
    (out / "effect.json").write_text(json.dumps({"seeds": args.seeds, "results": results}))


if __name__ == "__main__":
    main()
