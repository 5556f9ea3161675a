"""KTO on unpaired rows: the loss, the reference point and the weight advice against values
computed by hand; the objective trains the "unpaired" kind with its own recipe."""

import math

import pytest
import torch

from tuneforge.objectives import OBJECTIVES
from tuneforge.objectives.kto import kl_reference_point, kto_unpaired_loss, kto_weight_advice

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_kto_unpaired_loss_against_a_hand_computation():
    # r = policy - reference = (0.5, -0.5, -2.0); z = 0.2; β = 0.5; w_d = 1, w_u = 2.
    labels = torch.tensor([True, False, True])
    loss, reward = kto_unpaired_loss(t(-1.0, -2.0, -3.0), t(-1.5, -1.5, -1.0), labels, t(0.2), beta=0.5,
                                     desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.tolist() == pytest.approx([
        1 - sigmoid(0.5 * (0.5 - 0.2)),  # desirable: 1 - σ(β (r - z))
        2 * (1 - sigmoid(0.5 * (0.2 + 0.5))),  # undesirable: w_u (1 - σ(β (z - r)))
        1 - sigmoid(0.5 * (-2.0 - 0.2)),
    ])
    assert reward.tolist() == pytest.approx([0.25, -0.25, -1.0])  # β r


def test_a_negative_kl_estimate_is_clamped_and_z_takes_no_gradient():
    policy = t(-1.0, -2.0).requires_grad_()
    kl = t(-3.0).requires_grad_()
    loss, _ = kto_unpaired_loss(policy, t(-1.0, -2.0), torch.tensor([True, False]), kl, beta=1.0)
    assert loss.tolist() == pytest.approx([0.5, 0.5])  # r = 0, z = max(0, -3) = 0: 1 - σ(0)
    loss.sum().backward()
    assert kl.grad is None
    # d/dr (1 - σ(r)) = -σ'(0) = -1/4 for the desirable row, +1/4 for the undesirable one
    assert policy.grad.tolist() == pytest.approx([-0.25, 0.25])


def test_a_batch_with_one_label_only():
    for label in (True, False):
        loss, _ = kto_unpaired_loss(t(0.0, 1.0), t(0.0, 0.0), torch.tensor([label, label]), 0.0, beta=1.0)
        sign = 1 if label else -1
        assert loss.tolist() == pytest.approx([0.5, 1 - sigmoid(sign * 1.0)])


def test_kl_reference_point_from_mismatched_pairs():
    policy_kl = t(-1.0, -2.0).requires_grad_()
    z = kl_reference_point(policy_kl, t(-2.0, -2.5))
    assert z.item() == pytest.approx(0.75) and not z.requires_grad  # mean(1, 0.5), detached
    assert kl_reference_point(t(-3.0, -2.0), t(-2.0, -2.5)).item() == 0.0  # mean -0.25, clamped at 0


@pytest.mark.parametrize("counts, weights, expected", [
    ((4, 4), (1.0, 1.0), None),  # ratio 1
    ((4, 3), (1.0, 1.0), None),  # ratio 4/3
    ((10, 2), (1.0, 1.0), "= 5, outside [1, 4/3]"),  # set desirable_weight in [0.2, 0.267]
    ((2, 10), (1.0, 1.0), "in [5, 6.67]"),
    ((2, 10), (5.0, 1.0), None),
])
def test_weight_advice_follows_trls_rule(counts, weights, expected):
    advice = kto_weight_advice(*counts, *weights)
    assert advice is None if expected is None else expected in advice
    if counts == (10, 2):
        assert "in [0.2, 0.267]" in advice


def test_weight_advice_for_a_single_label():
    assert "every training row is desirable" in kto_weight_advice(3, 0, 1.0, 1.0)
    assert "every training row is undesirable" in kto_weight_advice(0, 3, 1.0, 1.0)


def test_kto_trains_unpaired_rows_with_its_own_recipe():
    kto = OBJECTIVES["kto"]
    assert (kto.data_kind, kto.recipe) == ("unpaired", "unpaired")
    assert not hasattr(kto, "pair_loss")  # no pair reading of KTO left
