"""The didactic bandit of arXiv 2404.14367 (App. I): π_ref, the rewards, the fitted tiny Llama."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo.onpolicy.bandit import (
    REWARDS,
    build_bandit_model,
    fit_to_reference,
    reference_distribution,
    reference_kl,
    reward_r1,
    reward_r2,
)


def test_reference_is_a_distribution_deterministic_in_the_seed():
    probs = reference_distribution()
    assert probs.shape == (100,)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (probs > 0).all()
    torch.testing.assert_close(reference_distribution(seed=0), probs)
    assert not torch.equal(reference_distribution(seed=1), probs)


def test_reference_matches_the_binned_squashed_cauchy():
    """Bin k of [−1, 1] holds F(atanh e_{k+1}) − F(atanh e_k), F(x) = 1/2 + arctan((x + 0.7)/0.4)/π.
    Edge bin 0: atanh(0.98) = ½ ln 99 = 2.2976, F(−2.2976) = 1/2 + arctan(−3.994)/π = 0.0780 —
    the squashed tail piles up there. With 10,000 draws every bin is within 0.01 of its mass."""
    edges = np.linspace(-1.0, 1.0, 101)
    with np.errstate(divide="ignore"):
        cdf = 0.5 + np.arctan((np.arctanh(edges) + 0.7) / 0.4) / math.pi
    exact = torch.from_numpy(np.diff(cdf)).float()
    assert exact[0].item() == pytest.approx(0.0780, abs=1e-4)
    probs = reference_distribution()
    assert (probs - exact).abs().max().item() < 0.01


def test_reference_mode_is_near_minus_0_7():
    """−0.7 falls in bin (−0.7 + 1)/2 · 100 = 15; the interior mode (edge bins hold the squashed
    tails) is within a few bins of it. The exact interior mode is bin 16, the top being flat."""
    interior_mode = 1 + reference_distribution()[1:-1].argmax().item()
    assert abs(interior_mode - 15) <= 5


def test_reference_refuses_an_empty_bin():
    with pytest.raises(ValueError, match="raise n_draws"):
        reference_distribution(n_draws=50)


def test_rewards_by_hand():
    """R1(all 70) = e⁰ = 1; R1(all 80) = exp(−(10/10)²) = e⁻¹ = 0.3679;
    R1(70, 80) = (1 + e⁻¹)/2 = 0.6839. R2 is the same bump at 20: R2(all 10) = R2(all 30) = e⁻¹."""
    tokens = torch.tensor([[70] * 10, [80] * 10, [70, 80] * 5])
    torch.testing.assert_close(
        reward_r1(tokens), torch.tensor([1.0, 1 / math.e, (1 + 1 / math.e) / 2])
    )
    symmetric = reward_r2(torch.tensor([[20] * 10, [10] * 10, [30] * 10]))
    torch.testing.assert_close(symmetric, torch.tensor([1.0, 1 / math.e, 1 / math.e]))
    assert REWARDS == {"r1": reward_r1, "r2": reward_r2}


def test_fit_to_reference_and_load_back(tmp_path):
    """A 64-wide, 2-layer Llama, 100 Adam steps (lr 1e-2, 32 responses a step): the KL(π_ref‖π_θ)
    at each position falls from ≈ 0.52 (near-uniform π_θ over 102 tokens) to ≈ 8e-5 (measured);
    bound 1e-3."""
    out = build_bandit_model(tmp_path / "bandit", n_bins=100, hidden_size=64, num_layers=2, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("t3 t70").input_ids == [100, 3, 70]  # <ctx> first, token id = action
    context = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(out)
    probs = reference_distribution()

    curve = fit_to_reference(model, probs, context, steps=100, lr=1e-2, response_length=10, seed=0)
    assert len(curve) == 100 and curve[-1] < curve[0] / 100
    kl = reference_kl(model, probs, context, response_length=10)
    assert kl.shape == (10,)
    assert (kl < 1e-3).all(), kl

    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reference_kl(reloaded, probs, context, response_length=10), kl)
