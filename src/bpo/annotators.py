"""Annotators: who says which of two responses is better.

Every annotator answers `compare(prompts, a, b)` with a signed preference per pair (> 0 prefers a,
< 0 prefers b, 0 is a tie) and counts its calls. Annotators that score one response at a time
(a Python function now, reward models later) derive `compare` from `score`.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from bpo.config import ConfigError


class Annotator(ABC):
    """Judges pairs of responses; `calls` counts the pairs it was asked about."""

    def __init__(self) -> None:
        self.calls = 0

    @abstractmethod
    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Signed preference of a over b for each pair."""

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Signed preference of a over b for each pair: > 0 prefers a, < 0 b, 0 a tie."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(a)} a's and {len(b)} b's")
        self.calls += len(prompts)
        return self._compare(prompts, a, b)


class RewardAnnotator(Annotator):
    """An annotator that scores each response; preference is the score difference."""

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """A scalar reward per (prompt, response)."""

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        scores = self.score(list(prompts) * 2, list(a) + list(b))
        n = len(prompts)
        return [sa - sb for sa, sb in zip(scores[:n], scores[n:])]


class FunctionAnnotator(RewardAnnotator):
    """A Python function `reward(prompt, response) -> float`, named as `module:function`."""

    def __init__(self, spec: str, field: str = "annotator.function") -> None:
        super().__init__()
        self.spec = spec
        self.fn = load_function(spec, field)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"annotator {self.spec}: returned non-finite rewards {bad[:3]}")
        return scores


def load_function(spec: str, field: str) -> Callable[[str, str], float]:
    """Import `module:function`, with an error that says what is wrong and how to fix it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} is not module:function; e.g. mypkg:reward")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({e}); check it is on "
            "PYTHONPATH or installed"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field}: {module_name} has no function {attr!r}")
    return fn
