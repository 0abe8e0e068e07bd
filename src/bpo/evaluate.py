"""Evaluation: win rate against the reference responses, reward, length and KL(π_θ‖π_sft).

Win rate decodes greedily and counts a win only for a strictly higher score (ties lose), as in
the paper's code. KL is estimated from one sample per prompt, y ~ π_θ(·|x), as the mean of
log π_θ(y|x) − log π_sft(y|x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bpo.annotators import Annotator, RewardAnnotator
from bpo.config import SamplingConfig
from bpo.policy import Policy
from bpo.tasks import Example

LogpFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]

EVAL_SEED = 1234


@torch.no_grad()
def evaluate(
    policy: Policy,
    examples: Sequence[Example],
    prompt_ids: Sequence[list[int]],
    scorer: Annotator,
    sampling: SamplingConfig,
    sft_logps: LogpFn | None = None,
    logprob_batch_size: int = 64,
) -> dict[str, float]:
    """`eval/*` metrics of the policy on held-out prompts with references."""
    prompts = [e.prompt for e in examples]
    references = [e.response for e in examples]
    greedy = policy.generate(prompt_ids, sampling, greedy=True)
    texts = policy.decode(greedy)
    metrics: dict[str, float] = {"eval/length": sum(map(len, greedy)) / len(greedy)}
    if isinstance(scorer, RewardAnnotator):
        scores = scorer.score(prompts * 2, texts + references)
        ours, theirs = scores[: len(texts)], scores[len(texts) :]
        metrics["eval/reward"] = sum(ours) / len(ours)
        metrics["eval/reference_reward"] = sum(theirs) / len(theirs)
        wins = [a > b for a, b in zip(ours, theirs)]
    else:
        wins = [m > 0 for m in scorer.compare(prompts, texts, references)]
    metrics["eval/win_rate"] = sum(wins) / len(wins)
    if sft_logps is not None:
        with torch.random.fork_rng(devices=[]):  # evaluation must not move training's RNG
            torch.manual_seed(EVAL_SEED)
            samples = policy.generate(prompt_ids, sampling)
        ours = policy.logps_batched(prompt_ids, samples, logprob_batch_size)  # (N,)
        theirs = sft_logps(prompt_ids, samples)  # (N,)
        metrics["eval/kl_sft"] = (ours - theirs).mean().item()
    return metrics
