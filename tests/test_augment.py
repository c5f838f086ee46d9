import math

import pytest
import torch

from cgc_hf.augment import CropFlip, resize, sample_crop_flip, warp


def _ramp(b: int, h: int, w: int) -> torch.Tensor:
    """Image whose value is the normalised x coordinate of each pixel centre, in [0, 1]."""
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    return x.expand(b, 1, h, w).clone()


def test_identity_and_flip_are_exact():
    x = torch.randn(3, 2, 8, 10, dtype=torch.float64)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3, dtype=torch.float64)
    same = warp(x, CropFlip(full, torch.tensor([False, False, False])))
    flipped = warp(x, CropFlip(full, torch.tensor([True, False, True])))
    torch.testing.assert_close(same, x)
    torch.testing.assert_close(flipped[0], x[0].flip(-1))
    torch.testing.assert_close(flipped[1], x[1])
    torch.testing.assert_close(flipped[2], x[2].flip(-1))


def test_crop_of_left_half_equals_slicing():
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    out = warp(x, CropFlip(box, torch.tensor([False])), size=(6, 4))
    torch.testing.assert_close(out, x[..., :4])


def test_sampled_boxes_respect_scale_ratio_and_bounds():
    g = torch.Generator().manual_seed(0)
    t = sample_crop_flip(4000, scale=(0.2, 0.6), ratio=(0.5, 2.0), flip_prob=0.3, generator=g)
    x0, y0, x1, y1 = t.boxes.unbind(1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (x1 <= 1 + 1e-6) & (y1 <= 1 + 1e-6)).all())
    area = (x1 - x0) * (y1 - y0)
    ratio = (x1 - x0) / (y1 - y0)
    assert float(area.min()) >= 0.2 - 1e-5 and float(area.max()) <= 0.6 + 1e-5
    assert float(ratio.min()) >= 0.5 - 1e-4 and float(ratio.max()) <= 2.0 + 1e-4
    assert abs(float(t.flip.float().mean()) - 0.3) < 0.03


def test_aspect_is_respected_in_pixels():
    g = torch.Generator().manual_seed(1)
    t = sample_crop_flip(2000, scale=(0.3, 0.3), ratio=(1.0, 1.0), aspect=2.0, generator=g)
    w_pix = (t.boxes[:, 2] - t.boxes[:, 0]) * 200  # image 100 x 200
    h_pix = (t.boxes[:, 3] - t.boxes[:, 1]) * 100
    torch.testing.assert_close(w_pix, h_pix, rtol=1e-4, atol=1e-3)


def test_fallback_when_no_attempt_fits():
    # Scale 1 with a ratio far from the image's cannot fit: the fallback is the full width with
    # the height trimmed to the nearest allowed ratio (3), as RandomResizedCrop does.
    g = torch.Generator().manual_seed(0)
    t = sample_crop_flip(64, scale=(1.0, 1.0), ratio=(3.0, 4.0), generator=g)
    torch.testing.assert_close(t.boxes[:, 2] - t.boxes[:, 0], torch.ones(64))
    torch.testing.assert_close(t.boxes[:, 3] - t.boxes[:, 1], torch.full((64,), 1 / 3))
    assert bool((t.boxes >= 0).all()) and bool((t.boxes <= 1 + 1e-6).all())


@pytest.mark.parametrize("seed", range(3))
def test_recorded_flip_always_matches_applied_flip(seed):
    g = torch.Generator().manual_seed(seed)
    t = sample_crop_flip(512, generator=g)
    out = warp(_ramp(512, 16, 16), t)  # (B, 1, 16, 16)
    decreasing = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert torch.equal(decreasing, t.flip)


@pytest.mark.parametrize("size", [(7, 7), (56, 56), (224, 224)])
def test_same_transform_at_any_resolution_matches_closed_form(size):
    # For f(x, y) = x the warp is exact in closed form: output u in (0, 1) samples source
    # x0 + u (x1 - x0), mirrored when flipped. Checking it at several resolutions shows images and
    # heatmaps of any size are warped by the same geometry.
    g = torch.Generator().manual_seed(3)
    t = sample_crop_flip(16, scale=(0.3, 0.9), generator=g)
    t = CropFlip(t.boxes.double(), t.flip)
    h, w = size
    src = _ramp(16, 64, 64)  # fine source, so bilinear sampling of a linear ramp is exact inside
    out = warp(src, t, size=size)[:, 0]  # (B, h, w)
    u = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    u = torch.where(t.flip[:, None], 1 - u, u)  # (B, w)
    expected = t.boxes[:, :1] + u * (t.boxes[:, 2:3] - t.boxes[:, :1])  # (B, w)
    # Sampling points within half a source pixel of the border are clamped by the padding mode.
    inside = (expected > 0.5 / 64) & (expected < 1 - 0.5 / 64)
    torch.testing.assert_close(out[:, h // 2][inside], expected[inside], atol=1e-9, rtol=0)


def test_heatmaps_keep_their_rank():
    hm = torch.rand(2, 5, 5)
    t = sample_crop_flip(2, generator=torch.Generator().manual_seed(0))
    assert warp(hm, t, 9).shape == (2, 9, 9)
    assert warp(hm, t).shape == (2, 5, 5)
    assert math.isfinite(float(warp(hm, t).sum()))


def _grid_sample_reference(x: torch.Tensor, t: CropFlip, size: tuple[int, int]) -> torch.Tensor:
    grid = torch.nn.functional.affine_grid(t.theta(), [x.shape[0], 1, *size], align_corners=False)
    return torch.nn.functional.grid_sample(
        x[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]


@pytest.mark.parametrize(
    ("grid", "size"), [((1, 1), (8, 8)), ((2, 2), (56, 56)), ((7, 7), (56, 56)), ((14, 10), (9, 7))]
)
def test_heatmap_warp_and_resize_with_gradient_equal_grid_sample_and_interpolate(grid, size):
    # A heatmap that requires a gradient is warped by matrix products (deterministic backward on
    # every device); values and gradients must be those of grid_sample / interpolate.
    g = torch.Generator().manual_seed(5)
    t = sample_crop_flip(32, scale=(0.08, 1.0), generator=g)
    t = CropFlip(t.boxes.double(), t.flip)
    x = torch.rand(32, *grid, dtype=torch.float64, generator=g)
    up = torch.rand(32, *size, dtype=torch.float64, generator=g)  # gradient arriving from above
    cases = [
        (lambda v: warp(v, t, size), lambda v: _grid_sample_reference(v, t, size)),
        (
            lambda v: resize(v, size),
            lambda v: torch.nn.functional.interpolate(
                v[:, None], size, mode="bilinear", align_corners=False
            )[:, 0],
        ),
    ]
    for ours, reference in cases:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = ours(a), reference(b)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        (out * up).sum().backward()
        (ref * up).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
