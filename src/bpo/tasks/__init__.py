"""Built-in tasks: prompts, demonstrations, references and a gold reward, all made from a seed."""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class Example:
    """A prompt with one response: an SFT demonstration or an evaluation reference."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Task:
    """The data a run needs, split into disjoint prompt sets.

    `reward` names the gold reward as `module:function`, a function
    `reward(prompt: str, response: str) -> float` that annotators and evaluation import.
    """

    name: str
    sft: list[Example]
    align_prompts: list[str]
    eval: list[Example]
    reward: str


# name -> module; each module has make_task(seed, n_sft, n_align, n_eval), build_tokenizer() and
# demonstrate(rng, prompt), the noisy demonstrator that writes its SFT data.
TASKS = {
    "digest": "bpo.tasks.digest",  # summarisation stand-in (TL;DR)
    "quiz": "bpo.tasks.quiz",  # helpfulness stand-in: questions with a checkable answer
    "guard": "bpo.tasks.guard",  # harmlessness stand-in: refuse to leak a secret, help otherwise
}


def _module(name: str):
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def load_task(name: str, seed: int, n_sft: int, n_align: int, n_eval: int) -> Task:
    """Build the built-in task `name` from its seed."""
    return _module(name).make_task(seed=seed, n_sft=n_sft, n_align=n_align, n_eval=n_eval)


def task_demonstrator(name: str) -> Callable[[random.Random, str], str]:
    """The noisy demonstrator of the built-in task `name`: `demonstrate(rng, prompt) -> str`."""
    return _module(name).demonstrate


def task_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the built-in task `name`, for building its tiny model."""
    return _module(name).build_tokenizer()
