import math

import pytest
import torch

from cgc_hf.errors import CGCValueError
from cgc_hf.loss import CGCLoss


def _loop_loss(aug, pos, tau, all_aug=None, offset=0):
    """InfoNCE over heatmaps written from the paper's definition, one row at a time."""
    all_aug = aug if all_aug is None else all_aug

    def unit(h):
        v = h.flatten() / h.sum()
        return v / v.norm()

    total = 0.0
    for i in range(aug.shape[0]):
        q = unit(aug[i])
        num = math.exp(float(q @ unit(pos[i])) / tau)
        den = num + sum(
            math.exp(float(q @ unit(all_aug[k])) / tau)
            for k in range(all_aug.shape[0])
            if k != offset + i
        )
        total += -math.log(num / den)
    return total / aug.shape[0]


def _loop_loss_autograd(aug, pos, tau):
    terms = []
    for i in range(aug.shape[0]):
        unit = lambda h: (h.flatten() / h.sum()) / (h.flatten() / h.sum()).norm()  # noqa: E731
        q = unit(aug[i])
        sims = [q @ unit(pos[i])] + [q @ unit(aug[k]) for k in range(aug.shape[0]) if k != i]
        logits = torch.stack(sims) / tau
        terms.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_matches_loop_definition(tau):
    g = torch.Generator().manual_seed(0)
    aug = torch.rand(5, 4, 6, generator=g, dtype=torch.float64)
    pos = torch.rand(5, 4, 6, generator=g, dtype=torch.float64)
    got = CGCLoss(tau)(aug, pos)
    assert abs(float(got) - _loop_loss(aug, pos, tau)) < 1e-5


def test_gradients_match_loop_definition():
    g = torch.Generator().manual_seed(1)
    aug = torch.rand(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ga, gp = torch.autograd.grad(CGCLoss(0.5)(aug, pos), (aug, pos))
    ra, rp = torch.autograd.grad(_loop_loss_autograd(aug, pos, 0.5), (aug, pos))
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gp, rp, rtol=1e-4, atol=1e-6)


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    aug = torch.rand(3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: CGCLoss(0.5)(a, p), (aug, pos))


def test_scale_invariant_and_lower_when_aligned():
    g = torch.Generator().manual_seed(3)
    aug = torch.rand(6, 5, 5, generator=g)
    other = torch.rand(6, 5, 5, generator=g)
    loss = CGCLoss(0.5)
    torch.testing.assert_close(loss(aug, aug * 3.0), loss(aug, aug))
    assert float(loss(aug, aug)) < float(loss(aug, other))


def test_gathered_negatives_match_the_full_batch_loop():
    g = torch.Generator().manual_seed(4)
    full_aug = torch.rand(6, 3, 3, generator=g, dtype=torch.float64)
    full_pos = torch.rand(6, 3, 3, generator=g, dtype=torch.float64)
    # This "process" holds rows 2..3 of a 6-row global batch.
    local = slice(2, 4)

    def gather(z):
        from cgc_hf.loss import heatmap_embedding

        rest = heatmap_embedding(full_aug)
        return torch.cat([rest[:2], z, rest[4:]]), 2

    got = CGCLoss(0.5, gather=gather)(full_aug[local], full_pos[local])
    ref = _loop_loss(full_aug[local], full_pos[local], 0.5, all_aug=full_aug, offset=2)
    assert abs(float(got) - ref) < 1e-6


def test_all_zero_heatmaps_stay_finite():
    aug = torch.zeros(3, 4, 4, requires_grad=True)
    loss = CGCLoss(0.5)(aug, torch.zeros(3, 4, 4))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(aug.grad).all()


def test_bad_arguments():
    with pytest.raises(CGCValueError, match="temperature"):
        CGCLoss(0.0)
    with pytest.raises(CGCValueError, match="heatmaps_aug"):
        CGCLoss()(torch.rand(2, 3, 3), torch.rand(2, 4, 4))
