"""Evaluation cost as a share of a run: one evaluation against the training of an epoch.

Each setting runs ``recipes/finetune.py``'s ``main()`` in this process, as a user runs it, with
the trainer's optimizer steps and evaluations timed; evaluations fall between the timed steps
(``--eval_steps``), so both are measured under the same conditions. Inside each evaluation the
time of its parts is taken too: the consistency metric (two heatmap passes per image), the
heatmaps of the mask metrics (Content Heatmap, pointing game: one more pass) and the heatmap
figure; the rest is the plain forward pass of the accuracy and the bookkeeping. Clocks: the
process's CPU time on one thread (robust to other work on the machine; data loading runs in the
process, ``dataloader_num_workers=0``) and wall time.

Settings:

* ``default``: the README's first command (``recipes/configs/synthetic.yaml``,
  ``--labels_per_class 10``: EfficientNet-Lite0 at 96 px, 8 labeled + 8 unlabeled images a
  step, 200 evaluation images, one evaluation after 100 steps);
* ``224``: fine-tuning at 224 px: ResNet-18 from random weights on the generated shapes at
  224 px (with masks, so every metric runs), 320 labeled training images in batches of 16, 80
  evaluation images, no unlabeled pool.

Per setting it prints the median step and evaluation times, the epoch time (steps per epoch x
step), the cost per image of training and of evaluation, and the share of the run spent
evaluating: with the setting's own schedule, with an evaluation every epoch, and with an
evaluation every epoch on an evaluation split as large as the training split (CUB, Pets).

Usage:
    python benchmarks/eval_cost.py                       # both settings (a few minutes on 2 cores)
    python benchmarks/eval_cost.py --settings 224 --evaluations 2
    python benchmarks/eval_cost.py --settings 224 --recipe_args --eval_explanation_images 16
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, list[str]] = {
    "default": ["--labels_per_class", "10"],
    "224": [
        "--model_name_or_path",
        "resnet18",
        "--no_pretrained",
        "--image_size",
        "224",
        "--synthetic_kwargs",
        json.dumps({"num_classes": 4, "image_size": 224, "train_size": 320, "eval_size": 80}),
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "40",
    ],
}
"""Command-line flags of ``recipes/finetune.py`` per setting (on top of its configs)."""

# The schedule each setting has in a real run: optimizer steps and evaluations.
SCHEDULE = {"default": (100, 1), "224": (None, None)}  # None: one evaluation per epoch


class Clocks:
    """CPU and wall seconds of named sections; a section inside another of the same name is not
    counted twice."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._open: set[str] = set()

    @contextlib.contextmanager
    def section(self, name: str):
        if name in self._open:
            yield
            return
        self._open.add(name)
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[name] += time.process_time() - cpu
            self.wall[name] += time.perf_counter() - wall
            self._open.discard(name)

    def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        return dict(self.cpu), dict(self.wall)


def timed(clocks: Clocks, name: str, fn, skip_inside: tuple[str, ...] = ()):
    """``fn`` wrapped in ``clocks.section(name)`` (not counted while ``skip_inside`` is open)."""

    def wrapper(*args, **kwargs):
        if clocks._open.intersection(skip_inside):
            return fn(*args, **kwargs)
        with clocks.section(name):
            return fn(*args, **kwargs)

    return wrapper


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def run_setting(
    name: str, evaluations: int, steps_between: int, out: Path, extra: list[str] = ()
) -> dict:
    """Train with an evaluation every ``steps_between`` steps; the times of both, per part."""
    import cgc_hf.evaluation
    import cgc_hf.training.loop
    from cgc_hf import CGCModel, CGCTrainer

    recipe = load_recipe()
    clocks = Clocks()
    marks: list[tuple[float, float, float, float]] = []  # per step: cpu, wall, eval cpu, wall

    class TimedTrainer(CGCTrainer):
        def _step_end(self) -> None:
            marks.append(
                (
                    time.process_time(),
                    time.perf_counter(),
                    clocks.cpu["evaluate"],
                    clocks.wall["evaluate"],
                )
            )

        def evaluate(self):
            before = clocks.snapshot()
            with clocks.section("evaluate"):
                result = super().evaluate()
            after = clocks.snapshot()
            evals.append(
                {
                    clock: {k: after[i][k] - before[i].get(k, 0.0) for k in after[i]}
                    for i, clock in enumerate(("cpu", "wall"))
                }
            )
            trainers.append(self)
            return result

    evals: list[dict] = []
    trainers: list[CGCTrainer] = []
    patches = [
        (
            cgc_hf.evaluation,
            "consistency",
            timed(clocks, "consistency", cgc_hf.evaluation.consistency),
        ),
        (
            CGCModel,
            "explain",
            timed(clocks, "mask_heatmaps", CGCModel.explain, ("consistency", "figure")),
        ),
        (
            cgc_hf.training.loop,
            "write_figure",
            timed(clocks, "figure", cgc_hf.training.loop.write_figure),
        ),
        (recipe, "CGCTrainer", TimedTrainer),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, new in patches:
        setattr(obj, attr, new)
    try:
        argv = SETTINGS[name] + [
            "--max_train_steps",
            str(evaluations * steps_between),
            "--eval_steps",
            str(steps_between),
            "--dataloader_num_workers",
            "0",
            "--output_dir",
            str(out / name),
            *extra,
        ]
        recipe.main(argv)
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    trainer = trainers[-1]
    steps = []
    for prev, cur in zip(marks, marks[1:]):  # the first step (warm-up) is left out
        steps.append((cur[0] - prev[0] - (cur[2] - prev[2]), cur[1] - prev[1] - (cur[3] - prev[3])))
    # The first evaluation warms up too (its first heatmap passes, the figure's first draw).
    kept = evals[1:] if len(evals) > 1 else evals
    parts = ("consistency", "mask_heatmaps", "figure")

    def median(clock: str, key: str) -> float:
        return statistics.median(e[clock].get(key, 0.0) for e in kept)

    args = trainer.args
    images_per_step = args.per_device_train_batch_size + (
        args.unlabeled_batch_size if trainer.unlabeled is not None else 0
    )
    result = {
        "setting": name,
        "steps_per_epoch": trainer.steps_per_epoch,
        "images_per_step": images_per_step,
        "train_images": trainer.images["labeled"],
        "eval_images": trainer.images["eval"],
        "steps_timed": len(steps),
        "evaluations_timed": len(kept),
    }
    for i, clock in enumerate(("cpu", "wall")):
        step = statistics.median(s[i] for s in steps)
        evaluation = median(clock, "evaluate")
        result[clock] = {
            "step_s": step,
            "epoch_s": step * trainer.steps_per_epoch,
            "eval_s": evaluation,
            "eval_parts_s": {p: median(clock, p) for p in parts},
            "train_ms_per_image": 1000 * step / images_per_step,
            "eval_ms_per_image": 1000 * evaluation / max(1, trainer.images["eval"]),
        }
    return result


def shares(r: dict, clock: str = "cpu") -> dict[str, float]:
    """Share of the run spent evaluating, under three schedules."""
    c = r[clock]
    out = {"every_epoch": c["eval_s"] / (c["epoch_s"] + c["eval_s"])}
    steps, evals = SCHEDULE[r["setting"]]
    if steps is not None:
        out["schedule"] = evals * c["eval_s"] / (steps * c["step_s"] + evals * c["eval_s"])
    # An evaluation split as large as the training split, evaluated every epoch.
    per_epoch_eval = c["eval_ms_per_image"] * r["train_images"] / 1000
    out["every_epoch_equal_split"] = per_epoch_eval / (c["epoch_s"] + per_epoch_eval)
    return out


def report(r: dict, clock: str) -> str:
    c, s = r[clock], shares(r, clock)
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in c["eval_parts_s"].items())
    lines = [
        f"{r['setting']} ({clock}): {r['train_images']} training images, {r['steps_per_epoch']} "
        f"steps per epoch of {r['images_per_step']} images; {r['eval_images']} evaluation images",
        f"  step {c['step_s']:.2f} s ({c['train_ms_per_image']:.1f} ms per image), epoch "
        f"{c['epoch_s']:.1f} s; evaluation {c['eval_s']:.1f} s "
        f"({c['eval_ms_per_image']:.1f} ms per image; {parts})",
        "  evaluating: "
        + ", ".join(f"{v:.0%} of the run ({k.replace('_', ' ')})" for k, v in s.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--evaluations", type=int, default=3, help="evaluations per setting")
    p.add_argument("--steps_between", type=int, default=4, help="optimizer steps between them")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(
        "--recipe_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="the rest of the command line goes to recipes/finetune.py, e.g. "
        "--recipe_args --eval_explanation_images 16",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # CPU time then measures the work, whatever else the machine runs
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            results.append(
                run_setting(name, args.evaluations, args.steps_between, Path(tmp), args.recipe_args)
            )
    print()
    for r in results:
        print(report(r, "cpu"))
        print(report(r, "wall"))
    if args.json:
        for r in results:
            r["shares"] = {clock: shares(r, clock) for clock in ("cpu", "wall")}
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
