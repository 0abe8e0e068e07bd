"""Aggregate scores of an experiment grid: median / IQM / mean with stratified-bootstrap intervals.

The paper (arXiv 2406.12168, Fig. 3) reports, per method, aggregates over tasks × losses × seeds
with 95 % stratified-bootstrap confidence intervals, following Agarwal et al. 2021, "Deep RL at
the edge of the statistical precipice" (rliable): the strata are the (task, loss) groups, each
replicate resamples the runs WITH replacement WITHIN each stratum, pools them and aggregates, and
the interval is the percentile interval of the replicates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

Aggregate = Callable[..., Any]
"""An aggregate: called as f(x, axis=...) and reducing that axis (np.median, np.mean, iqm)."""

_MAX_RESAMPLED_VALUES = 2_000_000
"""Resampled values held at once by the bootstrap (memory bound; sets scipy's `batch`)."""


class Interval(NamedTuple):
    """A point estimate with its confidence interval [low, high]."""

    point: float
    low: float
    high: float


def iqm(x: ArrayLike, axis: int | None = None) -> Any:
    """Interquartile mean: the mean of the middle 50 % (bottom and top 25 % discarded).

    Robust to outlier runs yet less noisy than the median (Agarwal et al. 2021, Sec. 4.3).
    """
    return stats.trim_mean(x, 0.25, axis=axis)


AGGREGATES: dict[str, Aggregate] = {"median": np.median, "iqm": iqm, "mean": np.mean}
"""The aggregates of the paper's Fig. 3, by name; each takes an array and `axis`."""


def _as_scores(x: ArrayLike, name: str) -> np.ndarray:
    """1-D float array of finite scores, or a ValueError naming `name`."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per run); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite scores; drop failed runs first")
    return arr


def _pooled_statistic(*resampled: np.ndarray, fixed: np.ndarray, statistic: Aggregate, axis: int):
    """Pool the resampled strata and the fixed (constant) ones along `axis`, then aggregate."""
    batch_shape = resampled[0].shape[:-1]  # (n_batch,)
    constant = np.broadcast_to(fixed, (*batch_shape, fixed.size))  # (n_batch, n_fixed)
    pooled = np.concatenate([*resampled, constant], axis=-1)  # (n_batch, n_runs)
    return np.asarray(statistic(pooled, axis=axis), dtype=float)  # scipy's quantiles need floats


def stratified_bootstrap(
    strata: Sequence[ArrayLike],
    statistic: Aggregate,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of `statistic` over the pooled strata, resampling runs within each.

    The stratified bootstrap of Agarwal et al. 2021 (rliable): every replicate keeps each
    stratum's size, so the interval reflects the within-stratum (seed) variance only.
    """
    if len(strata) == 0:
        raise ValueError("stratified_bootstrap: no strata given (empty input)")
    arrays = [_as_scores(s, f"stratum {i}") for i, s in enumerate(strata)]
    for i, arr in enumerate(arrays):
        if arr.size == 0:
            raise ValueError(f"stratified_bootstrap: stratum {i} is empty (no runs)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples} must be at least 1")

    point = float(statistic(np.concatenate(arrays), axis=-1))
    # A constant stratum (a single run included) resamples to itself: keep it fixed, outside
    # scipy, which refuses samples of fewer than two observations.
    is_constant = [bool(np.all(arr == arr[0])) for arr in arrays]
    varying = [arr for arr, const in zip(arrays, is_constant) if not const]
    fixed = np.concatenate([np.empty(0), *(a for a, const in zip(arrays, is_constant) if const)])
    if not varying:
        return Interval(point, point, point)

    n_runs = sum(arr.size for arr in arrays)
    with warnings.catch_warnings():
        # Near-degenerate replicates (e.g. a median stuck on one value) are fine for percentiles.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            varying,  # scipy resamples each sample independently: the stratified bootstrap
            partial(_pooled_statistic, fixed=fixed, statistic=statistic),
            n_resamples=n_resamples,
            batch=max(1, _MAX_RESAMPLED_VALUES // n_runs),
            vectorized=True,
            paired=False,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    ci = result.confidence_interval
    return Interval(point, float(ci.low), float(ci.high))


def _score(row: Mapping[str, Any], score: str, index: int) -> float | None:
    """The row's score as a float, or None for a failed run (missing, None, empty, NaN)."""
    value = row.get(score)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"row {index}: {score}={value!r} is not a number") from err
    return None if math.isnan(out) else out


def _key(row: Mapping[str, Any], keys: Sequence[str], index: int) -> tuple[Hashable, ...]:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"row {index} lacks column(s) {missing}; it has {sorted(row)}")
    return tuple(row[k] for k in keys)


def _check_score_column(rows: Sequence[Mapping[str, Any]], score: str) -> None:
    if rows and not any(score in row for row in rows):
        raise ValueError(f"no row has the score column {score!r}; columns: {sorted(rows[0])}")


def aggregate_table(
    rows: Iterable[Mapping[str, Any]],
    score: str = "win_rate",
    by: str = "method",
    strata: Sequence[str] = ("task", "loss"),
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per `by` group: median / IQM / mean of `score` with stratified-bootstrap 95 % intervals.

    As the paper's Fig. 3 (Agarwal et al. 2021): strata are the `strata` groups, runs their seeds.
    Failed runs (score missing, None, empty or NaN) are skipped and counted in "n_failed"; a group
    with no successful run gets NaN intervals.
    """
    rows = list(rows)
    _check_score_column(rows, score)
    groups: dict[Hashable, dict[tuple[Hashable, ...], list[float]]] = {}
    failed: dict[Hashable, int] = {}
    for i, row in enumerate(rows):
        (group,) = _key(row, [by], i)
        stratum = _key(row, strata, i)
        cells = groups.setdefault(group, {})
        failed.setdefault(group, 0)
        value = _score(row, score, i)
        if value is None:
            failed[group] += 1
        else:
            cells.setdefault(stratum, []).append(value)

    table = []
    for group, cells in groups.items():
        out: dict[str, Any] = {by: group, "n_runs": sum(len(c) for c in cells.values())}
        out["n_failed"] = failed[group]
        for name, aggregate in AGGREGATES.items():
            if cells:
                out[name] = stratified_bootstrap(
                    list(cells.values()), aggregate, n_resamples=n_resamples, seed=seed
                )
            else:
                out[name] = Interval(math.nan, math.nan, math.nan)
        table.append(out)
    return table


def cell_table(
    rows: Iterable[Mapping[str, Any]],
    score: str = "win_rate",
    keys: Sequence[str] = ("task", "method", "loss", "F"),
) -> list[dict[str, Any]]:
    """Per cell (unique combination of `keys`, first-appearance order): mean, sample std and n.

    std has ddof=1 (0.0 for a single run); failed runs are skipped and counted in "n_failed".
    """
    rows = list(rows)
    _check_score_column(rows, score)
    cells: dict[tuple[Hashable, ...], list[float]] = {}
    failed: dict[tuple[Hashable, ...], int] = {}
    for i, row in enumerate(rows):
        cell = _key(row, keys, i)
        values = cells.setdefault(cell, [])
        failed.setdefault(cell, 0)
        value = _score(row, score, i)
        if value is None:
            failed[cell] += 1
        else:
            values.append(value)

    table = []
    for cell, values in cells.items():
        arr = np.asarray(values, dtype=float)
        mean = float(arr.mean()) if arr.size else math.nan
        std = float(arr.std(ddof=1)) if arr.size > 1 else (0.0 if arr.size == 1 else math.nan)
        table.append(
            {
                **dict(zip(keys, cell)),
                "mean": mean,
                "std": std,
                "n": arr.size,
                "n_failed": failed[cell],
            }
        )
    return table


def _wins(scores_a: ArrayLike, scores_b: ArrayLike) -> np.ndarray:
    """Per-prompt wins of A over B: 1.0 where A's score is strictly higher (ties lose)."""
    a = _as_scores(scores_a, "scores_a")
    b = _as_scores(scores_b, "scores_b")
    if a.size != b.size:
        raise ValueError(f"scores_a has {a.size} prompts but scores_b has {b.size}; pair them")
    if a.size == 0:
        raise ValueError("head_to_head: no prompts (empty scores)")
    return (a > b).astype(float)  # ties lose, as in the paper's code  # (n_prompts,)


def head_to_head(scores_a: ArrayLike, scores_b: ArrayLike) -> float:
    """Win rate of A over B on the same prompts: the fraction where A scores strictly higher."""
    return float(_wins(scores_a, scores_b).mean())


def head_to_head_interval(
    scores_a: ArrayLike, scores_b: ArrayLike, n_resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Head-to-head win rate with a 95 % percentile interval, bootstrapping prompts (paired)."""
    # Resampling the per-prompt win indicators resamples (a_i, b_i) pairs together.
    wins = _wins(scores_a, scores_b)  # (n_prompts,)
    return stratified_bootstrap([wins], np.mean, n_resamples=n_resamples, seed=seed)


def format_interval(iv: Interval, scale: float = 100.0, digits: int = 1) -> str:
    """Render an interval as "72.3 [68.1, 76.0]" (scaled, e.g. win rates as percentages)."""
    if math.isnan(iv.point):
        return "n/a"
    point, low, high = (f"{v * scale:.{digits}f}" for v in iv)
    return f"{point} [{low}, {high}]"
