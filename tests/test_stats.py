"""Aggregates, stratified-bootstrap intervals and result tables against numbers worked by hand."""

import math

import numpy as np
import pytest

from bpo.stats import (
    AGGREGATES,
    Interval,
    aggregate_table,
    cell_table,
    format_interval,
    head_to_head,
    head_to_head_interval,
    iqm,
    stratified_bootstrap,
)

FAST = 2_000  # resamples: enough for the tolerances below, fast on a shared CPU


def width(iv: Interval) -> float:
    return iv.high - iv.low


# --- IQM ------------------------------------------------------------------------------------------


def test_iqm_discards_bottom_and_top_quarters():
    """8 values: drop 2 at each end → mean(2, 3, 4, 5) = 14 / 4 = 3.5; the 100 is discarded."""
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(3.5)
    assert iqm([0, 1, 2, 3, 4, 5, 6, 1e9]) == pytest.approx(3.5)  # top-quarter outlier: no effect
    assert iqm([-1e9, 1, 2, 3, 4, 5, 6, 7]) == pytest.approx(3.5)  # bottom quarter likewise
    assert np.mean([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(15.125)  # the mean does move


def test_iqm_vectorises_along_an_axis():
    """Row 0 → mean(2, 3, 4, 5) = 3.5; row 1 = 10·row 0 without the outlier → 35."""
    x = np.array([[0, 1, 2, 3, 4, 5, 6, 100], [0, 10, 20, 30, 40, 50, 60, 70]])
    np.testing.assert_allclose(iqm(x, axis=1), [3.5, 35.0])
    np.testing.assert_allclose(iqm(x.T, axis=0), [3.5, 35.0])
    np.testing.assert_allclose(iqm(x, axis=-1), [3.5, 35.0])


def test_aggregates_by_name():
    """median(1, 2, 3, 10) = 2.5; IQM = mean(2, 3) = 2.5; mean = 16 / 4 = 4."""
    x = np.array([1.0, 2.0, 3.0, 10.0])
    assert set(AGGREGATES) == {"median", "iqm", "mean"}
    assert AGGREGATES["median"](x, axis=-1) == pytest.approx(2.5)
    assert AGGREGATES["iqm"](x, axis=-1) == pytest.approx(2.5)
    assert AGGREGATES["mean"](x, axis=-1) == pytest.approx(4.0)


# --- stratified bootstrap -------------------------------------------------------------------------


def test_bootstrap_interval_covers_the_mean_of_a_known_sample():
    """200 draws of N(0.5, 0.1): the 95 % interval of the mean covers 0.5 and has width
    ≈ 2·1.96·σ/√n = 2·1.96·0.1/√200 ≈ 0.0277."""
    x = np.random.default_rng(0).normal(0.5, 0.1, size=200)
    iv = stratified_bootstrap([x], np.mean, n_resamples=FAST, seed=0)
    assert iv.point == pytest.approx(x.mean())
    assert iv.low < 0.5 < iv.high
    assert iv.low < iv.point < iv.high
    assert width(iv) == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(200), rel=0.25)


def test_bootstrap_is_reproducible_by_seed():
    x = np.random.default_rng(1).normal(size=30)
    a = stratified_bootstrap([x], np.mean, n_resamples=500, seed=3)
    b = stratified_bootstrap([x], np.mean, n_resamples=500, seed=3)
    c = stratified_bootstrap([x], np.mean, n_resamples=500, seed=4)
    assert a == b
    assert a != c


def test_stratified_replicates_keep_each_stratum_size():
    """Stratum A: 10 runs < 0.5, stratum B: 40 runs > 0.5. Counting runs below 0.5 gives exactly 10
    in every stratified replicate (interval [10, 10]); a pooled bootstrap lets the count vary."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 0.2, size=10)
    b = rng.uniform(0.8, 1.0, size=40)

    def n_low(x, axis):
        return np.sum(x < 0.5, axis=axis)

    stratified = stratified_bootstrap([a, b], n_low, n_resamples=FAST)
    pooled = stratified_bootstrap([np.concatenate([a, b])], n_low, n_resamples=FAST)
    assert stratified == Interval(10.0, 10.0, 10.0)
    assert pooled.point == 10.0
    assert pooled.low < 10.0 < pooled.high


def test_stratified_interval_is_narrower_than_pooled():
    """Means 0.1 and 0.9, sizes 10 and 40: pooled resampling adds the between-strata variance
    (the share of each stratum varies), so its interval of the mean is much wider."""
    rng = np.random.default_rng(0)
    a = rng.normal(0.1, 0.05, size=10)
    b = rng.normal(0.9, 0.05, size=40)
    stratified = stratified_bootstrap([a, b], np.mean, n_resamples=FAST)
    pooled = stratified_bootstrap([np.concatenate([a, b])], np.mean, n_resamples=FAST)
    assert stratified.point == pytest.approx(pooled.point)
    assert width(stratified) <= width(pooled)
    assert width(stratified) < 0.5 * width(pooled)


def test_constant_stratum_contributes_no_variance():
    """A = 10 runs of 0.2, B = 40 varying runs. Pooled mean = (10·0.2 + 40·mean(B)) / 50
    = 0.04 + 0.8·mean(B), so its interval is B's own interval of the mean, scaled by 0.8."""
    b = np.random.default_rng(2).normal(0.7, 0.1, size=40)
    iv = stratified_bootstrap([np.full(10, 0.2), b], np.mean, n_resamples=FAST)
    iv_b = stratified_bootstrap([b], np.mean, n_resamples=FAST)
    assert iv.point == pytest.approx(0.04 + 0.8 * b.mean())
    assert width(iv) == pytest.approx(0.8 * width(iv_b), rel=0.1)
    assert iv.low == pytest.approx(0.04 + 0.8 * iv_b.low, abs=0.005)
    assert iv.high == pytest.approx(0.04 + 0.8 * iv_b.high, abs=0.005)


def test_single_run_strata_give_a_defined_interval():
    """Strata [0.3], [0.7], [0.1, 0.5]: point = 1.6 / 4 = 0.4. Only the last stratum varies; its
    resampled sum is 0.2, 0.6 or 1.0, so every replicate mean is 0.3, 0.4 or 0.5."""
    iv = stratified_bootstrap([[0.3], [0.7], [0.1, 0.5]], np.mean, n_resamples=FAST)
    assert iv.point == pytest.approx(0.4)
    assert iv.low == pytest.approx(0.3)
    assert iv.high == pytest.approx(0.5)
    # Every stratum a single run: nothing to resample, the interval collapses to the point.
    assert stratified_bootstrap([[0.3], [0.7]], np.mean) == Interval(0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["median", "iqm", "mean"])
def test_constant_data_collapse_to_the_point(name):
    iv = stratified_bootstrap([[0.7] * 5, [0.7] * 3], AGGREGATES[name], n_resamples=FAST)
    assert iv.point == pytest.approx(0.7)
    assert iv.low == iv.high == iv.point


def test_bootstrap_rejects_empty_and_bad_input():
    with pytest.raises(ValueError, match="empty"):
        stratified_bootstrap([], np.mean)
    with pytest.raises(ValueError, match="stratum 1 is empty"):
        stratified_bootstrap([[0.1, 0.2], []], np.mean)
    with pytest.raises(ValueError, match="NaN"):
        stratified_bootstrap([[0.1, float("nan")]], np.mean)
    with pytest.raises(ValueError, match="confidence"):
        stratified_bootstrap([[0.1, 0.2]], np.mean, confidence=95)


# --- tables ---------------------------------------------------------------------------------------

ROWS = [
    # method bpo: 2 tasks × 1 loss × 2 seeds, plus one failed run.
    {"task": "tldr", "loss": "dpo", "method": "bpo", "seed": 0, "F": 4, "win_rate": "0.6"},
    {"task": "tldr", "loss": "dpo", "method": "bpo", "seed": 1, "F": 4, "win_rate": "0.8"},
    {"task": "hh", "loss": "dpo", "method": "bpo", "seed": 0, "F": 4, "win_rate": "0.5"},
    {"task": "hh", "loss": "dpo", "method": "bpo", "seed": 1, "F": 4, "win_rate": "0.9"},
    {"task": "hh", "loss": "dpo", "method": "bpo", "seed": 2, "F": 4, "win_rate": ""},
    # method online_dpo: 3 runs, two failed (None, NaN).
    {"task": "tldr", "loss": "dpo", "method": "online_dpo", "seed": 0, "F": 4, "win_rate": 0.4},
    {"task": "tldr", "loss": "dpo", "method": "online_dpo", "seed": 1, "F": 4, "win_rate": None},
    {"task": "hh", "loss": "dpo", "method": "online_dpo", "seed": 0, "F": 4, "win_rate": math.nan},
]


def test_aggregate_table_groups_and_counts_failures():
    """bpo: scores 0.6, 0.8, 0.5, 0.9 → median (0.6 + 0.8) / 2 = 0.7, IQM mean(0.6, 0.8) = 0.7,
    mean 2.8 / 4 = 0.7; one failed. online_dpo: the single score 0.4; two failed."""
    table = aggregate_table(ROWS, n_resamples=FAST)
    assert [r["method"] for r in table] == ["bpo", "online_dpo"]
    bpo, online = table
    scores = np.array([0.6, 0.8, 0.5, 0.9])
    assert (bpo["n_runs"], bpo["n_failed"]) == (4, 1)
    assert bpo["median"].point == pytest.approx(np.median(scores)) == pytest.approx(0.7)
    assert bpo["iqm"].point == pytest.approx(0.7)
    assert bpo["mean"].point == pytest.approx(scores.mean())
    for name in AGGREGATES:
        assert bpo[name].low <= bpo[name].point <= bpo[name].high
    # Strata tldr = {0.6, 0.8}, hh = {0.5, 0.9}: replicate means lie in [0.55, 0.85].
    assert 0.55 - 1e-9 <= bpo["mean"].low < bpo["mean"].high <= 0.85 + 1e-9
    assert (online["n_runs"], online["n_failed"]) == (1, 2)
    assert online["mean"] == Interval(0.4, 0.4, 0.4)


def test_aggregate_table_all_failed_group_and_missing_columns():
    rows = [{"task": "t", "loss": "dpo", "method": "m", "win_rate": None}]
    (only,) = aggregate_table(rows)
    assert (only["n_runs"], only["n_failed"]) == (0, 1)
    assert math.isnan(only["mean"].point)
    with pytest.raises(ValueError, match="score column 'reward'"):
        aggregate_table(rows, score="reward")
    with pytest.raises(ValueError, match="lacks column"):
        aggregate_table([{"task": "t", "method": "m", "win_rate": 0.5}])
    with pytest.raises(ValueError, match="not a number"):
        aggregate_table([{"task": "t", "loss": "dpo", "method": "m", "win_rate": "abc"}])


def test_cell_table_mean_and_sample_std_by_hand():
    """Cell (A): 0.2, 0.4, 0.9 → mean 0.5; deviations −0.3, −0.1, 0.4; squares sum 0.26;
    sample variance 0.26 / 2 = 0.13; std √0.13 ≈ 0.360555. Cell (B): a single run → std 0.0."""
    rows = [
        {"task": "t", "method": "A", "win_rate": 0.2},
        {"task": "t", "method": "B", "win_rate": 0.7},
        {"task": "t", "method": "A", "win_rate": 0.4},
        {"task": "t", "method": "A", "win_rate": None},
        {"task": "t", "method": "A", "win_rate": 0.9},
    ]
    a, b = cell_table(rows, keys=("task", "method"))
    assert (a["task"], a["method"], a["n"], a["n_failed"]) == ("t", "A", 3, 1)
    assert a["mean"] == pytest.approx(0.5)
    assert a["std"] == pytest.approx(math.sqrt(0.13)) == pytest.approx(0.360555, abs=1e-6)
    assert (b["method"], b["n"], b["mean"], b["std"]) == ("B", 1, 0.7, 0.0)


def test_cell_table_default_keys_first_appearance_order():
    cells = cell_table(ROWS)
    assert [(c["task"], c["method"]) for c in cells] == [
        ("tldr", "bpo"),
        ("hh", "bpo"),
        ("tldr", "online_dpo"),
        ("hh", "online_dpo"),
    ]
    assert [c["n"] for c in cells] == [2, 2, 1, 0]
    assert cells[0]["mean"] == pytest.approx(0.7)
    assert cells[0]["std"] == pytest.approx(math.sqrt(0.02))  # (0.1² + 0.1²) / 1 = 0.02


# --- head to head ---------------------------------------------------------------------------------


def test_head_to_head_ties_lose():
    """[1, 2, 3] vs [1, 1, 4]: tie, win, loss → 1/3 (the tie counts as a loss)."""
    assert head_to_head([1, 2, 3], [1, 1, 4]) == pytest.approx(1 / 3)
    assert head_to_head([1, 1, 4], [1, 2, 3]) == pytest.approx(1 / 3)  # ties lose both ways
    assert head_to_head([5.0, 5.0], [5.0, 5.0]) == 0.0


def test_head_to_head_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="3 prompts but scores_b has 2"):
        head_to_head([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        head_to_head([], [])
    with pytest.raises(ValueError, match="3 prompts"):
        head_to_head_interval([1, 2, 3], [1, 2])


def test_head_to_head_interval_is_paired():
    """A = B + 0.01 on every prompt: A wins all, so every paired resample gives 1.0. An unpaired
    resampling of the two score lists would let the win rate vary."""
    b = np.random.default_rng(0).normal(size=50)
    assert head_to_head_interval(b + 0.01, b, n_resamples=FAST) == Interval(1.0, 1.0, 1.0)
    iv = head_to_head_interval([1, 2, 3], [1, 1, 4], n_resamples=FAST)
    assert iv.point == pytest.approx(1 / 3)
    assert iv.low == 0.0 and iv.high == 1.0  # 3 prompts: resamples with 0 or 3 wins are common


def test_format_interval():
    assert format_interval(Interval(0.723, 0.681, 0.76)) == "72.3 [68.1, 76.0]"
    assert format_interval(Interval(0.5, 0.25, 0.75), scale=1.0, digits=2) == "0.50 [0.25, 0.75]"
    assert format_interval(Interval(math.nan, math.nan, math.nan)) == "n/a"
