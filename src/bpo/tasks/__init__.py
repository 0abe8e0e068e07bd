"""Tasks: the built-in ones (prompts, demonstrations, references and a gold reward, all made from a
seed) and the paper's datasets (`bpo.tasks.hub`)."""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from bpo.config import TaskConfig


@dataclass(frozen=True)
class Example:
    """A prompt with one response: an SFT demonstration or an evaluation reference."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Task:
    """The data a run needs, split into disjoint prompt sets.

    `reward` names the gold reward as `module:function`, a function
    `reward(prompt: str, response: str) -> float` that annotators and evaluation import; None for
    a dataset, which has no gold reward (its annotator is a reward model). `truncated` counts the
    prompts, over all three sets, cut to `task.max_prompt_tokens`.
    """

    name: str
    sft: list[Example]
    align_prompts: list[str]
    eval: list[Example]
    reward: str | None
    truncated: int = 0


def draw_task(
    name: str,
    seed: int,
    sizes: tuple[int, int, int],
    prompt: Callable[[random.Random], str],
    demonstrate: Callable[[random.Random, str], str],
    reference: Callable[[str], str],
) -> Task:
    """A built-in task from its prompt generator, demonstrator and reference writer.

    Draws n_sft, n_align and n_eval distinct prompts (`sizes`), in that order, from one RNG seeded
    with `seed`, so no prompt is in two sets; then a demonstration for each SFT prompt.
    """
    if min(sizes) < 0:
        raise ValueError(f"set sizes must be >= 0, got n_sft, n_align, n_eval = {sizes}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh_prompts(n: int) -> list[str]:
        prompts = []
        while len(prompts) < n:
            p = prompt(rng)
            if p not in seen:
                seen.add(p)
                prompts.append(p)
        return prompts

    sft, align, evaluation = (fresh_prompts(n) for n in sizes)
    return Task(
        name=name,
        sft=[Example(p, demonstrate(rng, p)) for p in sft],
        align_prompts=align,
        eval=[Example(p, reference(p)) for p in evaluation],
        reward=f"bpo.tasks.{name}:reward",
    )


# name -> module; each module has make_task(seed, n_sft, n_align, n_eval), build_tokenizer() and
# demonstrate(rng, prompt), the noisy demonstrator that writes its SFT data.
TASKS = {
    "digest": "bpo.tasks.digest",  # summarisation stand-in (TL;DR)
    "quiz": "bpo.tasks.quiz",  # helpfulness stand-in: questions with a checkable answer
    "guard": "bpo.tasks.guard",  # harmlessness stand-in: refuse to leak a secret, help otherwise
}
# The paper's datasets, loaded by `bpo.tasks.hub` (imported on use: `datasets` is slow to import).
DATASETS = ("tldr", "hh_helpful", "hh_harmless")


def _module(name: str):
    if name in DATASETS:
        raise ValueError(
            f"task.name: {name} is a dataset; it has no built-in tokenizer or demonstrator (its "
            "SFT data are the dataset's human responses, its tokenizer the policy model's); these "
            f"exist for the built-in tasks {', '.join(TASKS)}"
        )
    if name not in TASKS:
        raise ValueError(
            f"task.name: unknown task {name!r}; built-in tasks: {', '.join(TASKS)}; datasets: "
            f"{', '.join(DATASETS)}"
        )
    return importlib.import_module(TASKS[name])


def load_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> Task:
    """The task `cfg` describes: a built-in task made from its seed, or a dataset loaded with
    `datasets.load_dataset` (`bpo.tasks.hub`; `tokenizer`, the policy's, counts prompt tokens for
    `task.max_prompt_tokens`). Built-in tasks ignore the dataset fields and the tokenizer."""
    if cfg.name in DATASETS:
        from bpo.tasks.hub import load_dataset_task

        return load_dataset_task(cfg, tokenizer)
    if cfg.n_sft is None:
        raise ValueError(
            f"task.n_sft: None (every row not taken for alignment) is for datasets; the built-in "
            f"task {cfg.name} draws its demonstrations from a generator, so set a number, e.g. "
            "task.n_sft=4000"
        )
    module = _module(cfg.name)
    return module.make_task(seed=cfg.seed, n_sft=cfg.n_sft, n_align=cfg.n_align, n_eval=cfg.n_eval)


def task_demonstrator(name: str) -> Callable[[random.Random, str], str]:
    """The noisy demonstrator of the built-in task `name`: `demonstrate(rng, prompt) -> str`."""
    return _module(name).demonstrate


def task_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the built-in task `name`, for building its tiny model."""
    return _module(name).build_tokenizer()
