"""Each DAP loss against numbers worked by hand."""

import math

import pytest
import torch

from bpo.losses import canonical_loss_name, dpo_loss, get_loss, ipo_loss, slic_loss

# One pair: log π_θ(y_w) = -1, log π_θ(y_l) = -3, log π_ref(y_w) = -2, log π_ref(y_l) = -2.5.
# chosen log-ratio = -1 - (-2) = 1; rejected log-ratio = -3 - (-2.5) = -0.5; h = 1.5.
ARGS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]))


def test_dpo_by_hand():
    """β = 0.1: βh = 0.15; −log σ(0.15) = log(1 + e^−0.15) = 0.62096."""
    out = dpo_loss(*ARGS, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.62096, abs=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.05)


def test_ipo_by_hand():
    """β = 0.1: 1/(2β) = 5; (1.5 − 5)² = 12.25."""
    assert ipo_loss(*ARGS, beta=0.1).losses.item() == pytest.approx(12.25)


def test_slic_by_hand():
    """β = 0.1: max(0, 1 − 0.15) = 0.85; β = 1: max(0, 1 − 1.5) = 0."""
    assert slic_loss(*ARGS, beta=0.1).losses.item() == pytest.approx(0.85)
    assert slic_loss(*ARGS, beta=1.0).losses.item() == 0.0


def test_losses_are_per_pair_and_differentiable():
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = dpo_loss(policy_chosen, torch.tensor([-3.0, -1.0]), torch.zeros(2), torch.zeros(2), 0.1)
    assert out.losses.shape == (2,)
    out.losses.sum().backward()
    # d/dx −log σ(β(x − c)) = −β σ(−β(x − c)) < 0: raising log π(y_w) lowers the loss
    assert (policy_chosen.grad < 0).all()


def test_trl_aliases():
    assert canonical_loss_name("sigmoid") == "dpo"
    assert canonical_loss_name("hinge") == "slic"
    assert get_loss("ipo") is ipo_loss
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        get_loss("kto")
