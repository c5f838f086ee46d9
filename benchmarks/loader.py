"""Input pipeline: the run's labeled + unlabeled loaders against timm's training pipeline.

Both pipelines read the same folder of JPEGs (``class/name.jpg``), decode, random-resized-crop,
flip, normalise and collate batches; nothing else runs. ``cgc`` is what a run builds: the image
folder through :func:`cgc_hf.load_splits` / :func:`cgc_hf.build_datasets` (half the images
labeled, half in the unlabeled pool) and the trainer's two loaders
(:mod:`cgc_hf.training.loaders`), each batch one labeled and one unlabeled batch. ``timm`` is
``timm.data.create_transform(..., is_training=True)`` over ``torchvision.datasets.ImageFolder`` in
a ``DataLoader``. Rounds alternate between the two in one process and the median images per
second of each is reported, per worker count: 0 = decoding in the main process on one core, timed
by the process's CPU time (robust to other work on the machine); with workers, wall time. torch
runs one thread per process, as in DataLoader workers.

Usage:
    python benchmarks/loader.py                          # 224 px JPEGs, workers 0 1 2
    python benchmarks/loader.py --jpeg_size 400 --workers 0 4 --images 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


def make_jpegs(folder: Path, n: int, side: int, classes: int = 4, seed: int = 0) -> None:
    """``n`` JPEGs of ``side`` x ``side`` px: random crops of scikit-image's photographs."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        c = int(rng.integers(min(h, w) // 2, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        img = Image.fromarray(photo[y : y + c, x : x + c]).resize((side, side), Image.BICUBIC)
        out = folder / f"class_{i % classes}"
        out.mkdir(parents=True, exist_ok=True)
        img.save(out / f"{i:05d}.jpg", quality=90)


def cgc_loaders(folder: Path, data_config: dict, batch: int, workers: int):
    """The labeled loader and the unlabeled stream a run builds for this folder."""
    from torch.utils.data import default_collate

    from cgc_hf import build_datasets, load_splits
    from cgc_hf.training.checkpoints import TrainerState
    from cgc_hf.training.loaders import UnlabeledStream, train_loader

    splits = load_splits(str(folder), seed=0, eval_fraction=0.05)
    n_train = len(splits.train)
    classes = len(set(splits.train[splits.spec.label_column]))
    data = build_datasets(splits, data_config, labels_per_class=n_train // (2 * classes), seed=0)
    args = SimpleNamespace(
        seed=0,
        per_device_train_batch_size=batch,
        unlabeled_batch_size=batch,
        dataloader_num_workers=workers,
    )
    labeled, _ = train_loader(data.labeled, default_collate, args)
    unlabeled = UnlabeledStream(data.unlabeled, default_collate, args, 1, 0)
    state = TrainerState()

    def batches():
        stream = unlabeled.batches(state)
        for b in labeled:
            u = next(stream)
            yield b["pixel_values"].shape[0] + u["pixel_values"].shape[0]

    return batches


def timm_loader(folder: Path, data_config: dict, batch: int, workers: int):
    """timm's training transform over an ImageFolder, batches of ``2 * batch`` images."""
    import timm.data
    from torchvision.datasets import ImageFolder

    tf = timm.data.create_transform(
        tuple(data_config["input_size"]),
        is_training=True,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(folder), transform=tf),
        batch_size=2 * batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )

    def batches():
        for x, _ in loader:
            yield x.shape[0]

    return batches


def images_per_second(batches, limit: int, clock=time.perf_counter) -> float:
    it = batches()
    next(it)  # worker start-up and the first batch are not throughput
    start, n = clock(), 0
    for count in it:
        n += count
        if n >= limit:
            break
    return n / (clock() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs in the folder")
    p.add_argument("--jpeg_size", type=int, default=224, help="side of the JPEGs, px")
    p.add_argument("--image_size", type=int, default=224, help="side of the model input, px")
    p.add_argument("--batch_size", type=int, default=32, help="labeled (= unlabeled) batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per worker count")
    p.add_argument("--interpolation", default="bilinear")
    p.add_argument("--folder", help="use this image folder instead of generating one")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # DataLoader workers run torch with one thread each; the main process (workers=0) does the
    # same, so every figure is per core, and a busy machine cannot stall intra-op thread pools.
    torch.set_num_threads(1)
    data_config = {
        "input_size": (3, args.image_size, args.image_size),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": args.interpolation,
        "crop_pct": 0.875,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "jpegs"
        if not args.folder:
            make_jpegs(folder, args.images, args.jpeg_size)
        limit = args.images // 2
        print(
            f"{args.images} JPEGs of {args.jpeg_size} px -> {args.image_size} px, batches of "
            f"{args.batch_size} labeled + {args.batch_size} unlabeled "
            f"(timm: {2 * args.batch_size}), cores={os.cpu_count()}"
        )
        results = []
        for workers in args.workers:
            cgc = cgc_loaders(folder, data_config, args.batch_size, workers)
            tm = timm_loader(folder, data_config, args.batch_size, workers)
            # Without workers everything runs in this process, so its CPU time measures the
            # pipeline even on a machine busy with other work; workers need wall time.
            clock = time.process_time if workers == 0 else time.perf_counter
            rates = {"cgc": [], "timm": []}
            for _ in range(args.rounds):
                rates["cgc"].append(images_per_second(cgc, limit, clock))
                rates["timm"].append(images_per_second(tm, limit, clock))
            row = {"workers": workers, **{k: statistics.median(v) for k, v in rates.items()}}
            row["clock"] = "cpu" if workers == 0 else "wall"
            row["ratio"] = row["cgc"] / row["timm"]
            results.append(row)
            print(
                f"workers={workers} ({row['clock']} time): cgc {row['cgc']:.0f} img/s, "
                f"timm {row['timm']:.0f} img/s, cgc/timm {row['ratio']:.2f}x",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
