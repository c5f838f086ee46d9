"""Metrics against hand-computed cases and loops written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cgc_hf import CGCModel
from cgc_hf.augment import sample_crop_flip, warp
from cgc_hf.errors import CGCValueError
from cgc_hf.metrics import (
    consistency,
    content_heatmap,
    eval_mode,
    gaussian_blur,
    heatmap_to_image_size,
    insertion_deletion,
    pointing_game,
    zero_heatmaps,
)


@pytest.fixture(scope="module")
def tiny_model() -> CGCModel:
    torch.manual_seed(0)
    return CGCModel.from_backbone("resnet18", num_labels=3, pretrained=False)


# ------------------------------------------------------------------------------ resizing
def test_heatmap_to_image_size_matches_hand_computed_bilinear():
    # A 2x2 heatmap with mass in one cell, upsampled x2 with align_corners=False: along each
    # axis the cell's weight is [1, 3/4, 1/4, 0] (border pixels clamp to the edge cell).
    hm = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    profile = torch.tensor([1.0, 0.75, 0.25, 0.0])
    out = heatmap_to_image_size(hm, (4, 4))
    torch.testing.assert_close(out[0], profile[:, None] * profile[None, :])
    assert heatmap_to_image_size(hm[0], (4, 4)).shape == (4, 4)


# ------------------------------------------------------------------------ content heatmap
def test_content_heatmap_three_quarters_in_box():
    hm = torch.zeros(1, 4, 4)
    hm[0, 0, 0] = 2.0  # inside the box
    hm[0, 1, 1] = 1.0  # inside the box
    hm[0, 3, 3] = 1.0  # outside
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    torch.testing.assert_close(content_heatmap(hm, mask), torch.tensor([75.0]))
    # Scale of the heatmap does not matter; a bool mask works the same.
    torch.testing.assert_close(content_heatmap(7 * hm, mask.bool()), torch.tensor([75.0]))


def test_content_heatmap_at_image_resolution():
    # Same 2x2 heatmap as above on a 4x4 image, mask = top-left quadrant:
    # inside = (1 + 3/4)^2 = 3.0625 of a total (1 + 3/4 + 1/4)^2 = 4 -> 76.5625 %.
    hm = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    torch.testing.assert_close(content_heatmap(hm, mask), torch.tensor([76.5625]))


def test_content_heatmap_counts_zero_heatmaps_as_zero():
    hm = torch.stack([torch.zeros(3, 3), torch.ones(3, 3)])  # (2, 3, 3)
    mask = torch.ones(2, 6, 6)
    torch.testing.assert_close(content_heatmap(hm, mask), torch.tensor([0.0, 100.0]))
    assert zero_heatmaps(hm).tolist() == [True, False]
    assert zero_heatmaps(torch.full((1, 2, 2), float("nan"))).tolist() == [True]


def test_mask_metrics_reject_mismatched_shapes():
    with pytest.raises(CGCValueError, match="masks"):
        content_heatmap(torch.ones(2, 3, 3), torch.ones(2, 1, 6, 6))
    with pytest.raises(CGCValueError, match="same B"):
        pointing_game(torch.ones(2, 3, 3), torch.ones(3, 6, 6))


# ----------------------------------------------------------------------------- pointing game
def test_pointing_game_hit_and_miss():
    hm = torch.zeros(3, 2, 2)
    hm[0, 0, 1] = 1.0  # peak in the top-right cell
    hm[1, 0, 1] = 1.0
    # hm[2] stays all zero: it points nowhere
    top_right = torch.zeros(8, 8)
    top_right[:4, 4:] = 1
    bottom_left = torch.zeros(8, 8)
    bottom_left[4:, :4] = 1
    masks = torch.stack([top_right, bottom_left, torch.ones(8, 8)])
    torch.testing.assert_close(pointing_game(hm, masks), torch.tensor([1.0, 0.0, 0.0]))


# --------------------------------------------------------------------- insertion / deletion
class MatchModel(nn.Module):
    """p(class 0) = share of the box's pixels that equal the reference image exactly."""

    def __init__(self, reference: Tensor, box: Tensor) -> None:
        super().__init__()
        self.register_buffer("reference", reference)  # (3, H, W)
        self.register_buffer("box", box)  # (H, W) bool
        self.bn = nn.BatchNorm2d(3)  # only to check modes are handled per module
        self.modes_seen: list[bool] = []

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        self.modes_seen.append(self.training)
        same = ((pixel_values - self.reference).abs() < 1e-6).all(1)  # (N, H, W)
        p = (same & self.box).flatten(1).sum(1) / self.box.sum()  # (N,)
        return {"logits": torch.stack([torch.log(p), torch.log1p(-p)], 1)}  # softmax -> [p, 1-p]


def _box_setup():
    torch.manual_seed(0)
    image = torch.randn(3, 16, 16) + 3.0  # never 0, so the zero baseline differs everywhere
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[:8, :8] = True  # a quarter of the pixels
    hot = torch.zeros(4, 4)
    hot[:2, :2] = 1.0  # after the bilinear resize, every box pixel outranks every other
    heatmaps = torch.stack([hot, 1 - hot])  # (2, 4, 4): box first / box last
    return image, box, heatmaps


@pytest.mark.parametrize("chunk_size", [None, 5, 100])
def test_insertion_deletion_known_auc(chunk_size):
    image, box, heatmaps = _box_setup()
    pixel_values = image.expand(2, 3, 16, 16).clone()
    assert bool(((gaussian_blur(pixel_values, 5.0, 11) - pixel_values).abs() > 1e-6).all())
    model = MatchModel(image, box)
    ins, dele = insertion_deletion(
        model, pixel_values, heatmaps, torch.tensor([0, 0]), steps=16, chunk_size=chunk_size
    )
    # 16 chunks of 16 pixels; the 64 box pixels take 4 chunks. Box first: the curve rises
    # linearly over [0, 1/4] then stays at 1 -> AUC = 1 - 1/8. Box last: 1/8.
    torch.testing.assert_close(ins, torch.tensor([0.875, 0.125]))
    torch.testing.assert_close(dele, torch.tensor([0.125, 0.875]))
    assert not any(model.modes_seen)


def test_insertion_deletion_restores_each_module_mode():
    image, box, heatmaps = _box_setup()
    model = MatchModel(image, box).train()
    model.bn.eval()  # a deliberately frozen part must stay frozen
    insertion_deletion(model, image.expand(2, 3, 16, 16), heatmaps, torch.tensor([0, 0]), steps=4)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not model.bn.training


def _reference_auc(model, image, heatmap, cls, steps, start, end):
    """Curve built one image at a time from the definition."""
    h, w = image.shape[-2:]
    values = heatmap_to_image_size(heatmap, (h, w)).flatten().tolist()
    order = sorted(range(h * w), key=lambda i: -values[i])
    probs, fracs = [], []
    for t in range(steps + 1):
        n = (t * h * w) // steps
        m = torch.zeros(h * w)
        m[order[:n]] = 1
        m = m.view(1, h, w)
        x = start * (1 - m) + end * m
        with torch.no_grad():
            probs.append(model(x[None])["logits"].softmax(1)[0, cls].item())
        fracs.append(n / (h * w))
    return sum((fracs[i + 1] - fracs[i]) * (probs[i] + probs[i + 1]) / 2 for i in range(steps))


def test_insertion_deletion_matches_loop_on_real_model_and_keeps_bn_stats(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    heatmaps = torch.rand(2, 32, 32)  # no ties, so the pixel order is unambiguous
    classes = torch.tensor([0, 2])
    tiny_model.train()
    stats = {k: v.clone() for k, v in tiny_model.state_dict().items() if "running" in k}
    ins, dele = insertion_deletion(
        tiny_model,
        x,
        heatmaps,
        classes,
        steps=5,
        blur_sigma=2.0,
        blur_kernel=None,
        deletion_baseline="blur",
        chunk_size=4,
    )
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    for k, v in tiny_model.state_dict().items():
        if k in stats:
            torch.testing.assert_close(v, stats[k], rtol=0, atol=0)
    blurred = gaussian_blur(x, 2.0)
    tiny_model.eval()
    for i in range(2):
        ref_ins = _reference_auc(tiny_model, x[i], heatmaps[i], classes[i], 5, blurred[i], x[i])
        ref_del = _reference_auc(tiny_model, x[i], heatmaps[i], classes[i], 5, x[i], blurred[i])
        assert ins[i].item() == pytest.approx(ref_ins, abs=1e-5)
        assert dele[i].item() == pytest.approx(ref_del, abs=1e-5)


def test_gaussian_blur_matches_direct_2d_sum():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 9, 9)
    sigma, r = 1.3, 3
    out = gaussian_blur(x, sigma, 2 * r + 1)
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    k = [v / sum(k) for v in k]
    i, j = 4, 1  # a pixel whose window crosses the left border (replicate padding)
    ref = sum(
        k[a] * k[b] * x[0, :, min(max(i + a - r, 0), 8), min(max(j + b - r, 0), 8)]
        for a in range(2 * r + 1)
        for b in range(2 * r + 1)
    )
    torch.testing.assert_close(out[0, :, i, j], ref)
    with pytest.raises(CGCValueError, match="odd"):
        gaussian_blur(x, 1.0, 4)


def test_insertion_deletion_rejects_bad_arguments():
    image, box, heatmaps = _box_setup()
    model = MatchModel(image, box)
    x = image.expand(2, 3, 16, 16)
    with pytest.raises(CGCValueError, match="deletion_baseline"):
        insertion_deletion(model, x, heatmaps, torch.tensor([0, 0]), deletion_baseline="noise")
    with pytest.raises(CGCValueError, match="classes"):
        insertion_deletion(model, x, heatmaps, torch.tensor([0]))


# ------------------------------------------------------------------------------- consistency
class PixelMeanModel(nn.Module):
    """Heatmap = channel mean of the image at full resolution: exactly equivariant to any T."""

    def __init__(self, fixed: Tensor | None = None) -> None:
        super().__init__()
        self.fixed = fixed  # when set, the heatmap ignores the image (not equivariant)
        self.explained: list[Tensor] = []

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {"logits": pixel_values.mean((2, 3))}  # (B, 3): the brightest channel wins

    def explain(self, pixel_values: Tensor, classes: Tensor | None = None) -> Tensor:
        self.explained.append(classes)
        if self.fixed is not None:
            return self.fixed.expand(pixel_values.shape[0], *self.fixed.shape)
        return pixel_values.mean(1)  # (B, H, W)


def test_consistency_is_one_for_equivariant_heatmaps_and_uses_predicted_class():
    torch.manual_seed(3)
    x = torch.rand(6, 3, 16, 16)
    model = PixelMeanModel()
    gen = torch.Generator().manual_seed(0)
    # Full-image crops: T is identity or a mirror, both exact on the pixel grid.
    c = consistency(model, x, generator=gen, scale=(1.0, 1.0), ratio=(1.0, 1.0), size=16)
    torch.testing.assert_close(c, torch.ones(6))
    pred = x.mean((2, 3)).argmax(1)
    torch.testing.assert_close(model.explained[-1], torch.cat([pred, pred]))


def test_consistency_of_a_fixed_heatmap_under_flip():
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0  # a heatmap that ignores the image: the left half, always
    model = PixelMeanModel(fixed=left)
    x = torch.rand(3, 3, 16, 16)
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "size": 16}
    # Mirrored, T(heatmap(x)) covers the right half while heatmap(T(x)) is still the left one.
    torch.testing.assert_close(consistency(model, x, flip_prob=1.0, **full), torch.zeros(3))
    torch.testing.assert_close(consistency(model, x, flip_prob=0.0, **full), torch.ones(3))


def test_consistency_seeded_and_matches_per_sample_loop(tiny_model):
    tiny_model.eval()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 64, 64)
    a = consistency(tiny_model, x, generator=torch.Generator().manual_seed(7), size=24)
    b = consistency(tiny_model, x, generator=torch.Generator().manual_seed(7), size=24)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (3,) and bool(((a >= 0) & (a <= 1 + 1e-6)).all())
    t = sample_crop_flip(
        3, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 1.0, "cpu", torch.Generator().manual_seed(7)
    )
    for i in range(3):
        xi = x[i : i + 1]
        with torch.no_grad():
            cls = tiny_model(xi)["logits"].argmax(1)
        ti = type(t)(t.boxes[i : i + 1], t.flip[i : i + 1])
        pos = warp(tiny_model.explain(xi, cls), ti, 24).flatten()
        aug = tiny_model.explain(warp(xi, ti), cls, size=24).flatten()
        ref = (pos @ aug) / (pos.norm() * aug.norm()).clamp_min(1e-12)
        assert a[i].item() == pytest.approx(ref.item(), abs=1e-5)


def test_eval_mode_context_restores_on_error(tiny_model):
    tiny_model.train()
    with pytest.raises(RuntimeError), eval_mode(tiny_model):
        assert not tiny_model.training
        raise RuntimeError("boom")
    assert tiny_model.training
