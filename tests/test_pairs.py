"""Pair construction: two samples per prompt, and best-vs-worst of n with a temperature mix."""

import pytest

from bpo.annotators import FunctionAnnotator, PreferenceModelAnnotator
from bpo.config import ConfigError, SamplingConfig
from bpo.pairs import CollectionStats, _best_vs_worst


class ScriptedPolicy:
    """Stands in for a Policy: hands out scripted responses and records the temperatures."""

    def __init__(self, responses: list[list[int]]) -> None:
        self.responses = list(responses)
        self.temperatures: list[tuple[float, int]] = []

    def sample(self, prompt_ids, sampling: SamplingConfig, seed: int):
        self.temperatures.append((sampling.temperature, len(prompt_ids)))
        out, self.responses = self.responses[: len(prompt_ids)], self.responses[len(prompt_ids) :]
        return out

    def decode(self, responses):
        return [" ".join(str(t) for t in r) for r in responses]


def length_reward(prompt: str, response: str) -> float:
    """Longer responses score higher: the token count."""
    return float(len(response.split()))


@pytest.fixture
def annotator():
    return FunctionAnnotator("tests.test_pairs:length_reward")


def test_best_vs_worst_picks_the_extremes(annotator):
    """Prompt 0: lengths 2, 4, 1, 3 → best has 4 tokens, worst 1; prompt 1: all identical →
    dropped; prompt 2: distinct but equal rewards → a tie, dropped."""
    responses = [[1, 1], [2, 2, 2, 2], [3], [4, 4, 4],
                 [5], [5], [5], [5],
                 [6], [7], [8], [9]]  # fmt: skip
    stats = CollectionStats()
    kept = _best_vs_worst(ScriptedPolicy(responses), ["x0", "x1", "x2"], [[0], [0], [0]],
                          annotator, SamplingConfig(), 4, (), stats, 0)  # fmt: skip
    assert len(kept) == 1
    j, chosen, rejected, chosen_text, rejected_text, margin = kept[0]
    assert (j, chosen, rejected, margin) == (0, [2, 2, 2, 2], [3], 3.0)
    assert (chosen_text, rejected_text) == ("2 2 2 2", "3")
    assert (stats.dropped_identical, stats.dropped_ties, stats.responses_scored) == (1, 1, 8)


def test_temperature_mix_splits_the_samples(annotator):
    """RLHF Workflow: n/2 samples at temperature 1.0 and n/2 at 0.7."""
    policy = ScriptedPolicy([[i] * (i + 1) for i in range(8)])
    _best_vs_worst(policy, ["x0", "x1"], [[0], [0]], annotator, SamplingConfig(), 4,
                   (1.0, 0.7), CollectionStats(), 0)  # fmt: skip
    assert policy.temperatures == [(1.0, 4), (0.7, 4)]


def test_best_vs_worst_needs_rewards():
    pm = PreferenceModelAnnotator.__new__(PreferenceModelAnnotator)
    with pytest.raises(ConfigError, match="best-vs-worst of 4 needs rewards"):
        _best_vs_worst(ScriptedPolicy([]), ["x"], [[0]], pm, SamplingConfig(), 4, (),
                       CollectionStats(), 0)  # fmt: skip


def test_random_ties_keep_every_pair(train_config):
    from bpo.online import train

    cfg = train_config("ties", "method=offline_dpo", "annotator.ties=random")
    summary = train(cfg, progress=False)
    assert summary["dropped_ties"] == 0 and summary["pairs_annotated"] == 16


def test_best_vs_worst_run_end_to_end(train_config):
    from bpo.online import train

    cfg = train_config("bvw", "method=on_policy_bpo", "pairs.samples_per_prompt=4",
                       "pairs.temperatures=[1.0,0.7]")  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["pairs_annotated"] == 16
    assert summary["responses_scored"] >= 2 * 16


def test_temperatures_must_split_the_samples(train_config):
    with pytest.raises(ConfigError, match=r"^pairs.temperatures: \[1.0, 0.7, 0.5\] must"):
        train_config("bad", "method=bpo", "F=1", "pairs.samples_per_prompt=4",
                     "pairs.temperatures=[1.0,0.7,0.5]")  # fmt: skip
