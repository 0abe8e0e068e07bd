"""Pair construction for an annotation phase (Algorithm 1, lines 4–10).

For each prompt x drawn from the alignment set, two responses y1, y2 ~ π_β(·|x) are sampled; pairs
of identical responses are dropped before annotation, ties after it (or broken at random, by
config). With n > 2 samples per prompt, the best against the worst by reward (RLHF Workflow).
The kept pairs are oriented (y_w, y_l) and stored with log π_β of both responses, teacher-forced
from the behavior model that sampled them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace

from bpo.annotators import Annotator, RewardAnnotator
from bpo.config import ConfigError, SamplingConfig
from bpo.distributed import draw_seed, is_main, on_main
from bpo.human import SampleStore
from bpo.policy import Policy
from bpo.pool import PreferencePair


class PolicyCollapsed(RuntimeError):
    """An annotation phase found too few distinct, untied pairs: π_β samples one response.

    Carries the pairs it did annotate, so that none is lost.
    """

    def __init__(self, message: str, pairs: list[PreferencePair], stats: CollectionStats) -> None:
        super().__init__(message)
        self.pairs = pairs
        self.stats = stats


class PromptSampler:
    """Draws prompts without replacement from a seeded permutation, reshuffled each epoch."""

    def __init__(self, prompts: Sequence[str], prompt_ids: Sequence[list[int]], seed: int) -> None:
        if not prompts:
            raise ValueError("prompts: the alignment prompt set is empty")
        self.prompts = prompts
        self.prompt_ids = prompt_ids
        self.rng = random.Random(seed)
        self._order: list[int] = []

    def draw(self, n: int) -> list[int]:
        """Indices of the next n prompts."""
        out = []
        while len(out) < n:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.rng.shuffle(self._order)
            out.append(self._order.pop())
        return out


@dataclass
class CollectionStats:
    """What an annotation phase cost and what it dropped, with its wall time per stage
    (sampling, annotation, behavior_logps) in seconds."""

    prompts: int = 0
    dropped_identical: int = 0
    dropped_ties: int = 0
    dropped_failed: int = 0
    """Pairs (or best-vs-worst prompts) the annotator failed on (annotator.on_failure=skip)."""
    responses_scored: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: CollectionStats) -> None:
        self.prompts += other.prompts
        self.dropped_identical += other.dropped_identical
        self.dropped_ties += other.dropped_ties
        self.dropped_failed += other.dropped_failed
        self.responses_scored += other.responses_scored
        for stage, seconds in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def timed(self, stage: str) -> AbstractContextManager[None]:
        """Add the block's wall time to `seconds[stage]`."""
        return timed(self.seconds, stage)


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[stage]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


Candidate = tuple[int, list[int], list[int], str, str, float]
"""(prompt index in the round, y_w ids, y_l ids, y_w text, y_l text, preference strength)."""


def collect_pairs(
    policy: Policy,
    sampler: PromptSampler,
    annotator: Annotator,
    n_pairs: int,
    sampling: SamplingConfig,
    ties: str,
    rng: random.Random,
    phase: int,
    logprob_batch_size: int,
    samples_per_prompt: int = 2,
    temperatures: Sequence[float] = (),
    max_rounds: int = 20,
    seed: int = 0,
    behavior_logps: bool = True,
    store: SampleStore | None = None,
) -> tuple[list[PreferencePair], CollectionStats]:
    """Annotate exactly `n_pairs` pairs sampled from the current policy, π_β ← π_θ.

    Two samples per prompt are compared by the annotator; with more, the annotator's rewards pick
    the best and the worst (RLHF Workflow, arXiv 2405.07863, Algorithm 2), the samples split
    evenly over `temperatures` when given. Each round samples from its own seed, drawn from
    (`seed`, `phase`, round); with several processes the sampling is split between them and the
    annotator answers on the main one. With `behavior_logps` False (no loss reads them) the
    teacher-forced pass that computes them is skipped and the pairs store None. With a `store`
    (people annotate) each round's samples are kept, and taken back when the round is sampled
    again after a resume.
    """
    pairs: list[PreferencePair] = []
    stats = CollectionStats()
    for round_ in range(max_rounds):
        round_seed = draw_seed(seed, phase, round_)
        need = n_pairs - len(pairs)
        if need == 0:
            break
        idx = sampler.draw(need)
        prompts = [sampler.prompts[i] for i in idx]
        prompt_ids = [sampler.prompt_ids[i] for i in idx]
        stats.prompts += need
        if samples_per_prompt == 2 and not temperatures:
            kept = _two_samples(
                policy, prompts, prompt_ids, annotator, sampling, ties, rng, stats, round_seed,
                store,
            )  # fmt: skip
        else:
            kept = _best_vs_worst(
                policy, prompts, prompt_ids, annotator, sampling, samples_per_prompt,
                temperatures, stats, round_seed,
            )  # fmt: skip
        if not kept:
            continue
        kept_prompts = [prompt_ids[e[0]] for e in kept]
        behavior = [None] * (2 * len(kept))
        if behavior_logps:
            with stats.timed("behavior_logps"):
                behavior = policy.logps_batched(
                    kept_prompts * 2,
                    [e[1] for e in kept] + [e[2] for e in kept],
                    logprob_batch_size,
                ).tolist()  # log π_β(y_w|x), then log π_β(y_l|x): teacher-forced by the sampler
        for n, (j, chosen, rejected, chosen_text, rejected_text, margin) in enumerate(kept):
            pairs.append(
                PreferencePair(
                    prompt=prompts[j],
                    chosen=chosen_text,
                    rejected=rejected_text,
                    prompt_ids=list(kept_prompts[n]),
                    chosen_ids=chosen,
                    rejected_ids=rejected,
                    behavior_chosen_logp=behavior[n],
                    behavior_rejected_logp=behavior[len(kept) + n],
                    phase=phase,
                    margin=margin,
                )
            )
    if len(pairs) < n_pairs:
        raise PolicyCollapsed(
            f"annotation phase {phase}: only {len(pairs)} of {n_pairs} pairs after {max_rounds} "
            f"rounds ({stats.dropped_identical} identical, {stats.dropped_ties} ties dropped); "
            "the policy may have collapsed to one response: raise sampling.temperature or set "
            "annotator.ties=random",
            pairs,
            stats,
        )
    return pairs, stats


def _two_samples(
    policy: Policy,
    prompts: list[str],
    prompt_ids: list[list[int]],
    annotator: Annotator,
    sampling: SamplingConfig,
    ties: str,
    rng: random.Random,
    stats: CollectionStats,
    seed: int,
    store: SampleStore | None = None,
) -> list[Candidate]:
    """y1, y2 ~ π_β(·|x), identical pairs dropped, the rest compared by the annotator."""
    twice = [p for p in prompt_ids for _ in range(2)]
    with stats.timed("sampling"):
        kept = None if store is None else on_main(lambda: store.stored(seed, twice))
        samples = kept if kept is not None else policy.sample(twice, sampling, seed)
        if store is not None and kept is None and is_main():
            store.keep(seed, twice, samples)
    first, second = samples[0::2], samples[1::2]
    distinct = [j for j in range(len(prompts)) if first[j] != second[j]]
    stats.dropped_identical += len(prompts) - len(distinct)
    if not distinct:
        return []
    with stats.timed("annotation"):  # decoding included: the annotator reads text
        text_a = policy.decode([first[j] for j in distinct])
        text_b = policy.decode([second[j] for j in distinct])
        margins = on_main(lambda: annotator.compare([prompts[j] for j in distinct], text_a, text_b))
    kept = []
    for k, margin in enumerate(margins):
        if math.isnan(margin):  # the annotator failed on it (annotator.on_failure=skip)
            stats.dropped_failed += 1
            continue
        if margin == 0 and ties == "drop":
            stats.dropped_ties += 1
            continue
        j = distinct[k]
        if margin > 0 or (margin == 0 and rng.random() < 0.5):
            kept.append((j, first[j], second[j], text_a[k], text_b[k], abs(margin)))
        else:
            kept.append((j, second[j], first[j], text_b[k], text_a[k], abs(margin)))
    return kept


def _best_vs_worst(
    policy: Policy,
    prompts: list[str],
    prompt_ids: list[list[int]],
    annotator: Annotator,
    sampling: SamplingConfig,
    n: int,
    temperatures: Sequence[float],
    stats: CollectionStats,
    seed: int,
) -> list[Candidate]:
    """n samples per prompt ranked by reward; the best against the worst. Prompts whose samples
    are all identical, or whose best and worst rewards are equal, are dropped."""
    if not isinstance(annotator, RewardAnnotator):
        raise ConfigError(
            f"pairs.samples_per_prompt: best-vs-worst of {n} needs rewards, and the annotator "
            f"{type(annotator).__name__} only compares pairs; use samples_per_prompt=2"
        )
    groups = list(temperatures) or [sampling.temperature]
    per_prompt: list[list[list[int]]] = [[] for _ in prompts]
    for g, temperature in enumerate(groups):
        batch = [p for p in prompt_ids for _ in range(n // len(groups))]
        group_sampling = replace(sampling, temperature=temperature)
        with stats.timed("sampling"):
            responses = policy.sample(batch, group_sampling, draw_seed(seed, g))
        for i, response in enumerate(responses):
            per_prompt[i // (n // len(groups))].append(response)
    unique = [list({tuple(r): r for r in rs}.values()) for rs in per_prompt]
    flat = [(j, r) for j, rs in enumerate(unique) if len(rs) > 1 for r in rs]
    stats.dropped_identical += sum(len(rs) < 2 for rs in unique)
    if not flat:
        return []
    with stats.timed("annotation"):
        texts = policy.decode([r for _, r in flat])
        scores = on_main(lambda: annotator.score([prompts[j] for j, _ in flat], texts))
    stats.responses_scored += len(flat)
    kept = []
    for j in sorted({j for j, _ in flat}):
        rows = [m for m, (jj, _) in enumerate(flat) if jj == j and not math.isnan(scores[m])]
        if len(rows) < 2:  # the annotator failed on its samples (annotator.on_failure=skip)
            stats.dropped_failed += 1
            continue
        best = max(rows, key=lambda m: scores[m])
        worst = min(rows, key=lambda m: scores[m])
        if scores[best] == scores[worst]:
            stats.dropped_ties += 1
            continue
        kept.append((j, flat[best][1], flat[worst][1], texts[best], texts[worst],
                     scores[best] - scores[worst]))  # fmt: skip
    return kept
