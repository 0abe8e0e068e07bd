"""Supervised, best-of-N, RWR, REINFORCE and PPO losses of Tajwar et al. 2024 (arXiv 2404.14367).

Each loss takes log π_θ(y) summed over the response tokens, one entry per sampled response, shaped
(n,), and returns per-sample losses (n,) for the caller to reduce with a mean. Responses to the same
prompt share an entry of `group_ids`. Where the paper leaves a detail open, the authors' released
code (github.com/Asap7772/understanding-rlhf, `bandit_experiment/`) decides, and the docstring says
which file.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

STD_EPS = 1e-8
"""Added to the standard deviation in `standardise`, so a group of equal rewards maps to 0."""

NEGATIVE_GRADIENT_THRESHOLD = math.log(0.01)
"""The authors' guard: push y down only while π(y)/π(y_best) > 0.01 (transformer_learner.py)."""


class NLLOutput(NamedTuple):
    """Per-sample losses, (n,)."""

    losses: torch.Tensor


class NegativeGradientOutput(NamedTuple):
    """Per-sample losses and which non-best samples are still pushed down, each (n,)."""

    losses: torch.Tensor
    active: torch.Tensor


class RWROutput(NamedTuple):
    """Per-sample losses and the (detached) weights exp(Â/β), each (n,)."""

    losses: torch.Tensor
    weights: torch.Tensor


class PolicyGradientOutput(NamedTuple):
    """Per-sample losses and the (detached) advantages Â, each (n,)."""

    losses: torch.Tensor
    advantages: torch.Tensor


class PPOOutput(NamedTuple):
    """Per-sample losses, ratios π_θ/π_sampling and advantages (n,); the clipped share, a scalar."""

    losses: torch.Tensor
    ratios: torch.Tensor
    advantages: torch.Tensor
    clip_fraction: torch.Tensor


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each sample's group as 0..G-1 (in order of sorted id), and G."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, len(unique)


def standardise(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, eps: float = STD_EPS
) -> torch.Tensor:
    """(r − mean) / (std + eps) over the batch, or within each group when `group_ids` is given.

    The std is the population one (ddof 0, as np.std in the authors' code), so a single sample or a
    group of equal rewards maps to 0. Returns (n,), detached.
    """
    rewards = rewards.detach()
    if group_ids is None:
        group_ids = torch.zeros_like(rewards, dtype=torch.long)
    index, n_groups = _group_index(group_ids)
    sums = rewards.new_zeros(n_groups)
    count = sums.index_add(0, index, torch.ones_like(rewards))  # (G,)
    mean = sums.index_add(0, index, rewards) / count  # (G,)
    centred = rewards - mean[index]  # (n,)
    std = (sums.index_add(0, index, centred**2) / count).sqrt()  # (G,)
    return centred / (std[index] + eps)


def nll_loss(policy_logps: torch.Tensor) -> NLLOutput:
    """−log π_θ(y): Pref-FT on preferred responses, or best-of-N on the best of each group."""
    return NLLOutput(-policy_logps)


def negative_gradient_loss(
    policy_logps: torch.Tensor,
    is_best: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    threshold: float,
    worse: torch.Tensor | None = None,
) -> NegativeGradientOutput:
    """Best-of-N with a negative gradient: −log π(y_best) for the best of each group and
    +β·log π(y) for the others, each of those only while log π(y) − log π(y_best) > threshold.

    The guard is relative to the group's best sample, as in the authors' code
    (transformer_learner.py, `*_over_worse_actions`: the term is kept while π(y)/π(y_best) > 0.01,
    i.e. threshold = NEGATIVE_GRADIENT_THRESHOLD = log 0.01); the paper's text gave no exact form
    that we could find. Once a sample is pushed that far below the best, its term is 0 with zero
    gradient, so the loss cannot drive its probability to 0 and collapse the policy. The test uses
    the current (detached) log-probs. Exactly one sample per group must be marked best.

    Scale: the authors sum the terms of a group and average over prompts; the mean of these
    per-sample losses over n = G·N samples is that divided by N.

    `worse` (n,) marks the samples that may be pushed down (e.g. those with a lower reward than
    the best: a sample as good as the best is left alone); default: every sample but the best.
    """
    index, n_groups = _group_index(group_ids)
    bests_per_group = torch.zeros(n_groups, dtype=torch.long, device=index.device)
    bests_per_group = bests_per_group.index_add(0, index, is_best.long())  # (G,)
    if (bests_per_group != 1).any():
        raise ValueError(
            f"negative_gradient_loss: is_best marks {bests_per_group.tolist()} samples in the "
            "groups; mark exactly one best sample per group"
        )
    logps = policy_logps.detach()
    best_logps = logps.new_zeros(n_groups).index_add(0, index[is_best], logps[is_best])  # (G,)
    worse = ~is_best if worse is None else worse & ~is_best
    active = worse & (logps - best_logps[index] > threshold)  # (n,)
    pushed_down = torch.where(active, beta * policy_logps, torch.zeros_like(policy_logps))
    losses = torch.where(is_best, -policy_logps, pushed_down)
    return NegativeGradientOutput(losses, active)


def rwr_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    group_ids: torch.Tensor | None = None,
) -> RWROutput:
    """Reward-weighted regression: −exp(Â/β)·log π_θ(y), Â the standardised rewards.

    As in the authors' code (`awr` in transformer_learner.py), rewards are standardised within each
    prompt's N samples (pass `group_ids`; without it, over the batch) and the weights are not
    renormalised: the caller's mean divides by n. Â is at most √(N−1) within a group, so the
    weights stay below exp(√(N−1)/β).
    """
    weights = torch.exp(standardise(rewards, group_ids) / beta)  # (n,)
    return RWROutput(-weights * policy_logps, weights)


def reinforce_loss(
    policy_logps: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor | None = None
) -> PolicyGradientOutput:
    """REINFORCE: −Â·log π_θ(y), Â the rewards standardised over the batch (or per group)."""
    advantages = standardise(rewards, group_ids)  # (n,)
    return PolicyGradientOutput(-advantages * policy_logps, advantages)


def ppo_loss(
    policy_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    rewards: torch.Tensor,
    clip: float,
    group_ids: torch.Tensor | None = None,
) -> PPOOutput:
    """PPO's clipped surrogate at sequence level: −min(ρÂ, clip(ρ, 1−ε, 1+ε)Â) with
    ρ = exp(log π_θ(y) − log π_sampling(y)) and ε = `clip` (Schulman et al. 2017, Eq. 7).

    Â are the standardised rewards (no value function). `clip_fraction` is the share of samples
    whose clipped term is the smaller one, i.e. whose gradient the clip removes.
    """
    advantages = standardise(rewards, group_ids)  # (n,)
    ratios = torch.exp(policy_logps - sampling_logps.detach())  # (n,)
    unclipped = ratios * advantages
    clipped = torch.clamp(ratios, 1.0 - clip, 1.0 + clip) * advantages
    losses = -torch.minimum(unclipped, clipped)
    clip_fraction = (clipped < unclipped).float().mean()
    return PPOOutput(losses, ratios.detach(), advantages, clip_fraction)


def all_ordered_pairs(
    rewards: torch.Tensor, group_ids: torch.Tensor, min_gap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (chosen i, rejected j) of the same group with r_i − r_j > min_gap: DPO/IPO on all
    pairs of N samples (the authors' dpo_utils.py). `min_gap` = 0 skips only ties.

    Ordered by group id, then i, then j; returns two LongTensors of indices into the flat batch.
    """
    same_group = group_ids[:, None] == group_ids[None, :]  # (n, n)
    better = rewards[:, None] - rewards[None, :] > min_gap  # (n, n)
    chosen, rejected = (same_group & better).nonzero(as_tuple=True)  # row-major: by i, then j
    order = torch.sort(group_ids[chosen], stable=True).indices
    return chosen[order], rejected[order]
