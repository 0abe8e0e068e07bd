"""The tasks of `bpo study`: prompts, π_ref's checkpoint and the gold reward of each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bpo.checks import ConfigError
from bpo.onpolicy.bandit import (
    REWARDS,
    build_bandit_model,
    fit_to_reference,
    reference_distribution,
)
from bpo.onpolicy.config import StudyConfig

N_BINS = 100
"""Actions of the bandit: token ids 0..99."""
BANDIT_RESPONSE_LENGTH = 10
"""Tokens per bandit response (App. I)."""
BANDIT_FIT = {"steps": 100, "lr": 1e-2}
"""Adam steps and learning rate that fit the bandit's policy to π_ref (as the authors' run_sft)."""

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], object], list[float]]
"""(prompt ids, response ids, policy) -> gold rewards."""


@dataclass(frozen=True)
class StudyTaskData:
    prompts: list[str]
    """Training and evaluation prompts (text; the policy's tokenizer encodes them)."""
    model_path: str
    """π_ref's checkpoint, where fine-tuning starts."""
    reward: RewardFn


def load_study_task(cfg: StudyConfig, run_path: Path) -> StudyTaskData:
    """The task `cfg.task`; the bandit's π_ref is built and fitted into `run_path` when
    `cfg.model_path` is None."""
    if cfg.task.startswith("bandit_"):
        return _bandit(cfg, run_path)
    raise ConfigError(f"task: {cfg.task!r} is not built yet; use bandit_r1 or bandit_r2")


def _bandit(cfg: StudyConfig, run_path: Path) -> StudyTaskData:
    if cfg.sampling.max_new_tokens != BANDIT_RESPONSE_LENGTH:
        raise ConfigError(
            f"sampling.max_new_tokens: the bandit's responses have {BANDIT_RESPONSE_LENGTH} "
            f"tokens, got {cfg.sampling.max_new_tokens}; set sampling.max_new_tokens=10"
        )
    path = cfg.model_path or str(fit_bandit_reference(run_path / "reference", cfg.seed))
    reward = REWARDS[cfg.task.removeprefix("bandit_")]

    def score(prompts, responses, policy) -> list[float]:
        """The reward of each response's actions; a non-action token (the context or padding
        token) earns 0 at its position."""
        tokens = torch.tensor(responses)  # (n, L): fixed length, the tokenizer has no EOS
        valid = tokens < N_BINS  # action ids 0..N_BINS−1 come before <ctx> and <pad>
        per_token = reward(tokens.clamp(max=N_BINS - 1)[..., None])  # (n, L): one token each
        return (per_token * valid).mean(dim=1).tolist()

    return StudyTaskData([""], path, score)  # the prompt is the context token alone


def fit_bandit_reference(out_dir: Path, seed: int) -> Path:
    """A tiny Llama (initialised from `seed`) fitted to the bandit's π_ref (App. I: one fixed
    distribution from 10,000 draws) and saved to `out_dir`."""
    path = build_bandit_model(out_dir, n_bins=N_BINS, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    fit_to_reference(
        model, reference_distribution(n_bins=N_BINS), model.config.bos_token_id,
        response_length=BANDIT_RESPONSE_LENGTH, seed=seed, **BANDIT_FIT,
    )  # fmt: skip
    model.save_pretrained(path)
    return path
