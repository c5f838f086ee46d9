import pytest
import torch

from cgc_hf.cam import class_scores, combine, linear_head_cam
from cgc_hf.errors import CGCValueError


def _loop_cam(a, g, method):
    """Grad-CAM written from its definition, one sample and one position at a time."""
    b, c, h, w = a.shape
    out = torch.zeros(b, h, w, dtype=a.dtype)
    for i in range(b):
        weights = g[i].mean((1, 2)) if method == "gradcam" else None
        for y in range(h):
            for x in range(w):
                s = 0.0
                for k in range(c):
                    gk = weights[k] if method == "gradcam" else g[i, k, y, x]
                    s = s + gk * a[i, k, y, x]
                out[i, y, x] = max(float(s), 0.0)
    return out


@pytest.mark.parametrize("method", ["grad_x_act", "gradcam"])
def test_combine_matches_definition(method):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(combine(a, grad, method), _loop_cam(a, grad, method))


def test_unknown_method_is_rejected():
    with pytest.raises(CGCValueError, match="gradcam"):
        combine(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "scorecam")


@pytest.mark.parametrize("method", ["grad_x_act", "gradcam"])
def test_closed_form_equals_autograd_for_gap_linear_head(method):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    logits = a.mean((2, 3)) @ weight.T + bias  # GAP + linear
    classes = torch.tensor([0, 6, 3, 3])
    (grad,) = torch.autograd.grad(class_scores(logits, classes), a)
    torch.testing.assert_close(
        linear_head_cam(a.detach(), weight, classes), combine(a.detach(), grad, method)
    )


def test_closed_form_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([1, 3])
    assert torch.autograd.gradcheck(lambda a, w: linear_head_cam(a, w, classes), (a, w))


def test_second_order_heatmap_gradient_matches_finite_differences():
    # The training signal differentiates through the heatmap's own gradient (create_graph=True).
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def heat(w1):
        x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        a = torch.einsum("oc,bchw->bohw", w1, x).tanh()  # a tiny "layer"
        logits = (a**2).mean((2, 3)) @ torch.ones(3, 4, dtype=torch.float64)
        (grad,) = torch.autograd.grad(
            class_scores(logits, torch.tensor([0, 2])), a, create_graph=True
        )
        return combine(a, grad, "grad_x_act") + 1e-3  # stay off the relu kink

    assert torch.autograd.gradcheck(heat, (w1,))
