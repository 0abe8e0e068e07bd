"""Built-in tasks: prompts, demonstrations, references and a gold reward, all made from a seed."""

from __future__ import annotations

from dataclasses import dataclass


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


def load_task(name: str, seed: int, n_sft: int, n_align: int, n_eval: int) -> Task:
    """Build the built-in task `name` from its seed."""
    if name == "digest":
        from bpo.tasks.digest import make_task

        return make_task(seed=seed, n_sft=n_sft, n_align=n_align, n_eval=n_eval)
    raise ValueError(f"task.name: unknown task {name!r}; built-in tasks: digest")
