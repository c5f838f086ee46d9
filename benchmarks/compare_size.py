"""How much the heatmap comparison size changes the CGC loss and its gradient, and what it costs.

On real photographs (scikit-image's bundled images, random crops) and one model, the CGC loss
is computed with the same views and geometry at several comparison sizes. Against input
resolution it reports: the relative change of the loss, the cosine between the parameter
gradients of the CGC term, and the median time of the heatmap-comparison part (warp, resize,
InfoNCE: forward and backward from the heatmaps).

Usage:
    python benchmarks/compare_size.py --model resnet50 --sizes 224 112 56 28 14
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cgc_hf import CGCLoss, CGCModel, sample_crop_flip, warp


def photos(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random crops of scikit-image's sample photographs, ImageNet-normalised."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry"]
    imgs = [getattr(data, k)() for k in names if hasattr(data, k)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = torch.from_numpy(np.ascontiguousarray(imgs[i % len(imgs)][..., :3])).float() / 255
        img = img.permute(2, 0, 1)[None]  # (1, 3, H, W)
        h, w = img.shape[-2:]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[..., y : y + side, x : x + side]
        out.append(F.interpolate(crop, (size, size), mode="bilinear", antialias=True))
    x = torch.cat(out)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 112, 56, 28, 14])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    kwargs = {"img_size": args.image_size} if "vit" in args.model else {}
    model = CGCModel.from_backbone(args.model, num_labels=10, pretrained=False, model_kwargs=kwargs)
    model.eval()  # fixed BN statistics: the comparison size is the only thing that changes
    x = photos(args.batch, args.image_size, args.seed)
    t = sample_crop_flip(args.batch, generator=torch.Generator().manual_seed(args.seed))
    x_aug = warp(x, t)
    params = [q for q in model.parameters() if q.requires_grad]
    loss_fn = CGCLoss(model.config.temperature)
    cams = model.explain(torch.cat([x, x_aug]), create_graph=True)  # (2B, h, w)
    cam, cam_aug = cams.split(args.batch)
    print(
        f"model={args.model} input={args.image_size} layer grid={tuple(cam.shape[-2:])} "
        f"batch={args.batch} repeats={args.repeats}"
    )
    ref_loss, ref_grad = None, None
    print(f"{'size':>5} {'loss':>8} {'rel. change':>11} {'grad cosine':>11} {'time ms':>8}")
    for size in args.sizes:

        def compare(size: int = size) -> torch.Tensor:
            pos = warp(cam, t, size)
            aug = F.interpolate(
                cam_aug[:, None], (size, size), mode="bilinear", align_corners=False
            )[:, 0]
            return loss_fn(aug, pos)

        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss = compare()
            torch.autograd.grad(loss, (cam, cam_aug), retain_graph=True)
            times.append(time.perf_counter() - start)
        loss = compare()
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None]).double()
        if ref_loss is None:
            ref_loss, ref_grad = loss.item(), flat
        rel = abs(loss.item() - ref_loss) / abs(ref_loss)
        cos = float(F.cosine_similarity(flat, ref_grad, dim=0))
        print(
            f"{size:>5} {loss.item():8.4f} {rel:11.4f} {cos:11.4f} "
            f"{1000 * statistics.median(times):8.2f}"
        )


if __name__ == "__main__":
    main()
