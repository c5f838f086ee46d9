"""Heatmap consistency by the size of the evaluation crop, and how spread out the heatmaps are.

The consistency metric (``cgc_hf.consistency``) draws the paper's random resized crops, area
(0.08, 1) of the image; this splits its per-image cosines by crop area, so a model whose
heatmaps move with the image under large crops but not under small ones can be told from one
that is equally consistent everywhere. The entropy of the heatmap (as a distribution over the
layer's grid cells; ln(cells) for a flat map) says how broad the heatmaps are: a broad map has a
high cosine with any warped copy of itself.

Each model is evaluated on the images and with the crops ``recipes/evaluate.py`` uses (its own
data config, the same per-image seeds), so the overall mean equals evaluate.py's consistency.

Usage:
    python benchmarks/consistency_by_crop.py cgc-output/model cgc-baseline/model --eval_split test
"""

from __future__ import annotations

import argparse
import math

import torch

from cgc_hf import (
    CGCDataset,
    DataArguments,
    build_transform,
    collate,
    consistency,
    load_classifier,
)
from cgc_hf.data import Splits
from cgc_hf.evaluation import consistency_transforms

BINS = (0.0, 0.2, 0.4, 0.7, 1.0)


def measure(ref: str, splits: Splits, seed: int) -> dict[str, float]:
    """Mean consistency per crop-area bin, overall, and the mean heatmap entropy of one model."""
    model = load_classifier(ref).eval()
    transform = build_transform(model.config.data_config, train=False)
    dataset = CGCDataset(splits.eval, transform, splits.spec)
    cosines, areas, entropies = [], [], []
    for start in range(0, len(dataset), 50):
        idx = range(start, min(start + 50, len(dataset)))
        x = collate([dataset[i] for i in idx])["pixel_values"]  # (B, 3, H, W)
        with torch.no_grad():
            pred = model(x)["logits"].argmax(1)  # (B,)
        crops = consistency_transforms(seed, idx, aspect=x.shape[-1] / x.shape[-2])
        cosines.append(consistency(model, x, transforms=crops, classes=pred))
        box = crops.boxes  # (B, 4) x0, y0, x1, y1 as fractions
        areas.append((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
        p = model.explain(x, pred).flatten(1)  # (B, cells)
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        entropies.append(-(p * p.clamp_min(1e-12).log()).sum(1))
    cos, area = torch.cat(cosines), torch.cat(areas)
    out = {"all": float(cos.mean()), "entropy": float(torch.cat(entropies).mean())}
    out["flat_entropy"] = math.log(p.shape[1])
    for lo, hi in zip(BINS, BINS[1:]):
        inside = (area >= lo) & ((area < hi) if hi < 1 else (area <= hi))
        out[f"{lo}-{hi}"] = float(cos[inside].mean()) if inside.any() else float("nan")
        out[f"n {lo}-{hi}"] = int(inside.sum())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="+", help="cgc_hf model folders (or any classifier name)")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--seed", type=int, default=42, help="evaluate.py's --seed: the same crops")
    args = p.parse_args(argv)
    data_args = DataArguments(dataset_name=args.dataset, eval_split=args.eval_split)
    splits = data_args.load_splits(seed=args.seed)  # once: every model sees the same images
    spans = [f"{lo}-{hi}" for lo, hi in zip(BINS, BINS[1:])]
    print("| model | all | " + " | ".join(f"crop area {s}" for s in spans) + " | entropy |")
    print("|---" * (len(spans) + 3) + "|")
    for ref in args.models:
        r = measure(ref, splits, args.seed)
        cells = " | ".join(f"{r[s]:.3f} (n={r['n ' + s]})" for s in spans)
        print(
            f"| {ref} | {r['all']:.3f} | {cells} | {r['entropy']:.2f} / {r['flat_entropy']:.2f} |"
        )


if __name__ == "__main__":
    main()
