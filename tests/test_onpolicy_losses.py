"""The on-policy and best-of-N losses of arXiv 2404.14367 against numbers worked by hand."""

import math

import pytest
import torch

from bpo.onpolicy.losses import (
    NEGATIVE_GRADIENT_THRESHOLD,
    all_ordered_pairs,
    negative_gradient_loss,
    nll_loss,
    ppo_loss,
    reinforce_loss,
    rwr_loss,
    standardise,
)

E = math.e


def test_standardise_over_the_batch():
    """r = (1, 3, 1, 3): mean 2, population std √((1+1+1+1)/4) = 1 → (−1, 1, −1, 1)."""
    out = standardise(torch.tensor([1.0, 3.0, 1.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_standardise_per_group_with_ties_and_singletons():
    """Groups 0: (1, 3) → (−1, 1); 1: (5, 5), std 0 → (0, 0); 7: (2,) alone → 0."""
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0])
    out = standardise(rewards, torch.tensor([0, 0, 1, 1, 7]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]))
    assert standardise(torch.tensor([4.0])).item() == 0.0


def test_nll():
    """−log π: (−1.5, −0.2) → (1.5, 0.2)."""
    torch.testing.assert_close(
        nll_loss(torch.tensor([-1.5, -0.2])).losses, torch.tensor([1.5, 0.2])
    )


# Group 0: log π = (−1, −2, −8), the first best; group 1: (−3, −1), the second best.
NEG_LOGPS = [-1.0, -2.0, -8.0, -3.0, -1.0]
NEG_BEST = torch.tensor([True, False, False, False, True])
NEG_GROUPS = torch.tensor([0, 0, 0, 1, 1])


def test_negative_gradient_by_hand():
    """β = 0.5, threshold log 0.01 = −4.605. Log-ratios to the best: −2−(−1) = −1 (kept),
    −8−(−1) = −7 (dropped), −3−(−1) = −2 (kept). Losses: best −(−1) = 1; 0.5·(−2) = −1; 0;
    0.5·(−3) = −1.5; best 1. Gradients ∂/∂log π: −1 for a best, β = 0.5 kept, 0 dropped."""
    logps = torch.tensor(NEG_LOGPS, requires_grad=True)
    out = negative_gradient_loss(logps, NEG_BEST, NEG_GROUPS, 0.5, NEGATIVE_GRADIENT_THRESHOLD)
    torch.testing.assert_close(out.losses.detach(), torch.tensor([1.0, -1.0, 0.0, -1.5, 1.0]))
    assert out.active.tolist() == [False, True, False, True, False]
    out.losses.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-1.0, 0.5, 0.0, 0.5, -1.0]))


def test_negative_gradient_guard_is_relative_to_the_best():
    """Raising the threshold to −1.5 also drops the −2 sample of group 1 (log-ratio −2), but not
    group 0's (log-ratio −1): the guard compares with the group's best, not an absolute level."""
    logps = torch.tensor(NEG_LOGPS, requires_grad=True)
    out = negative_gradient_loss(logps, NEG_BEST, NEG_GROUPS, 0.5, -1.5)
    assert out.active.tolist() == [False, True, False, False, False]
    out.losses.sum().backward()
    assert logps.grad[3] == 0.0 and logps.grad[1] > 0  # descent lowers log π(y) only where kept


def test_negative_gradient_needs_one_best_per_group():
    with pytest.raises(ValueError, match=r"marks \[2, 0\] samples"):
        negative_gradient_loss(
            torch.tensor(NEG_LOGPS), torch.tensor([True, True, False, False, False]), NEG_GROUPS,
            0.5, NEGATIVE_GRADIENT_THRESHOLD,
        )  # fmt: skip


def test_rwr_by_hand():
    """r = (1, 3, 1, 3) → Â = (−1, 1, −1, 1); β = 1: w = (e⁻¹, e, e⁻¹, e); log π = (−1, −2, −3,
    −4): losses −w·log π = (e⁻¹, 2e, 3e⁻¹, 4e) = (0.3679, 5.4366, 1.1036, 10.8731). The weights
    are detached: ∂loss/∂log π = −w."""
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    out = rwr_loss(logps, torch.tensor([1.0, 3.0, 1.0, 3.0]), beta=1.0)
    expected = torch.tensor([1 / E, 2 * E, 3 / E, 4 * E])
    torch.testing.assert_close(out.losses.detach(), expected)
    out.losses.sum().backward()
    torch.testing.assert_close(logps.grad, -out.weights)


def test_rwr_standardises_per_group():
    """Groups (0, 0, 1), r = (0, 4, 7): Â = (−1, 1, 0); β = 2: w = (e^−0.5, e^0.5, 1)
    = (0.6065, 1.6487, 1), not renormalised."""
    out = rwr_loss(
        torch.full((3,), -1.0), torch.tensor([0.0, 4.0, 7.0]), 2.0, torch.tensor([0, 0, 1])
    )
    torch.testing.assert_close(out.weights, torch.tensor([E**-0.5, E**0.5, 1.0]))


def test_reinforce_by_hand():
    """Â = (−1, 1, −1, 1); log π = (−1, −2, −3, −4): −Â·log π = (−1, 2, −3, 4);
    ∂/∂log π = −Â = (1, −1, 1, −1): descent raises log π where Â > 0."""
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    out = reinforce_loss(logps, torch.tensor([1.0, 3.0, 1.0, 3.0]))
    torch.testing.assert_close(out.losses.detach(), torch.tensor([-1.0, 2.0, -3.0, 4.0]))
    out.losses.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_ppo_clips_on_both_sides_for_both_signs():
    """r = (3, 3, 1, 1) → Â = (1, 1, −1, −1); ρ = (1.5, 0.5, 1.5, 0.5); ε = 0.2.
    Â = 1, ρ = 1.5: min(1.5, 1.2) = 1.2 → loss −1.2, clipped, gradient 0.
    Â = 1, ρ = 0.5: min(0.5, 0.8) = 0.5 → loss −0.5, unclipped, ∂/∂log π = −Âρ = −0.5.
    Â = −1, ρ = 1.5: min(−1.5, −1.2) = −1.5 → loss 1.5, unclipped, ∂/∂log π = 1.5.
    Â = −1, ρ = 0.5: min(−0.5, −0.8) = −0.8 → loss 0.8, clipped, gradient 0.
    clip_fraction = 2/4 = 0.5."""
    sampling = torch.full((4,), -2.0)
    logps = (sampling + torch.tensor([1.5, 0.5, 1.5, 0.5]).log()).requires_grad_()
    out = ppo_loss(logps, sampling, torch.tensor([3.0, 3.0, 1.0, 1.0]), clip=0.2)
    torch.testing.assert_close(out.losses.detach(), torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    torch.testing.assert_close(out.ratios, torch.tensor([1.5, 0.5, 1.5, 0.5]))
    assert out.clip_fraction.item() == 0.5
    out.losses.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([0.0, -0.5, 1.5, 0.0]))


def test_ppo_on_policy_is_reinforce():
    """ρ = 1 inside the clip range: loss −Â = (−1, 1), nothing clipped."""
    out = ppo_loss(
        torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -5.0]), torch.tensor([3.0, 1.0]), 0.2
    )
    torch.testing.assert_close(out.losses, torch.tensor([-1.0, 1.0]))
    assert out.clip_fraction.item() == 0.0


def test_all_ordered_pairs_skips_ties_and_orders_by_group():
    """Group 0 = samples 4, 5 (r 2.0 > 1.0): (4, 5). Group 1 = samples 0-3, r = (0.5, 0.9, 0.5,
    0.1): 0 > 3; 1 > 0, 2, 3; 2 > 3; the 0-2 tie is skipped: 6 − 1 = 5 pairs, group 0 first."""
    rewards = torch.tensor([0.5, 0.9, 0.5, 0.1, 2.0, 1.0])
    groups = torch.tensor([1, 1, 1, 1, 0, 0])
    chosen, rejected = all_ordered_pairs(rewards, groups)
    assert chosen.tolist() == [4, 0, 1, 1, 1, 2]
    assert rejected.tolist() == [5, 3, 0, 2, 3, 3]
    assert chosen.dtype == torch.long


def test_all_ordered_pairs_min_gap():
    """min_gap 0.45 keeps gaps 1.0 (4, 5) and 0.8 (1, 3); the 0.4 gaps go."""
    rewards = torch.tensor([0.5, 0.9, 0.5, 0.1, 2.0, 1.0])
    chosen, rejected = all_ordered_pairs(rewards, torch.tensor([1, 1, 1, 1, 0, 0]), min_gap=0.45)
    assert (chosen.tolist(), rejected.tolist()) == ([4, 1], [5, 3])
