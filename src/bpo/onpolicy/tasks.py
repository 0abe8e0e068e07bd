"""The tasks of `bpo study`: prompts, π_ref's checkpoint and the gold reward of each."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bpo.checks import ConfigError
from bpo.config import TaskConfig
from bpo.distributed import draw_seed
from bpo.onpolicy.bandit import (
    REWARDS,
    build_bandit_model,
    fit_to_reference,
    reference_distribution,
)
from bpo.onpolicy.config import StudyConfig
from bpo.tasks import load_task

N_BINS = 100
"""Actions of the bandit: token ids 0..99."""
LENGTH_PROMPTS = 512
"""Training prompts of the length tasks (the digest task's alignment prompts)."""
SKEW_PROBABILITY = 0.95
"""skew_length: the share of offline responses drawn from the long side (Tajwar et al.: 95 %)."""
SKEW_OVERSAMPLE = 4
"""skew_length: candidates sampled from π_ref per offline response."""
BANDIT_RESPONSE_LENGTH = 10
"""Tokens per bandit response (App. I)."""
BANDIT_FIT = {"steps": 100, "lr": 1e-2}
"""Adam steps and learning rate that fit the bandit's policy to π_ref (as the authors' run_sft)."""

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], object], list[float]]
"""(prompt ids, response ids, policy) -> gold rewards."""


@dataclass
class StudyTaskData:
    prompts: list[str]
    """Training prompts (text; the policy's tokenizer encodes them)."""
    eval_prompts: list[str]
    """Prompts the evaluation samples π_θ on."""
    model_path: str
    """π_ref's checkpoint, where fine-tuning starts."""
    reward: RewardFn
    skew: bool = False
    """The offline dataset under-covers short responses (skew_length)."""


def load_study_task(cfg: StudyConfig, run_path: Path) -> StudyTaskData:
    """The task `cfg.task`; the bandit's π_ref is built and fitted into `run_path` when
    `cfg.model_path` is None."""
    if cfg.task.startswith("bandit_"):
        return _bandit(cfg, run_path)
    return _length(cfg)


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

    return StudyTaskData([""], [""], path, score)  # the prompt is the context token alone


def response_length(ids: Sequence[int], eos_id: int | None) -> int:
    """Tokens before EOS (a response that stops at once has length 0)."""
    return len(ids) - (1 if ids and ids[-1] == eos_id else 0)


def _length(cfg: StudyConfig) -> StudyTaskData:
    """Length tasks (Sec. 4) on the digest task's prompts: min_length and skew_length reward
    −length (shorter is better), mode_length −|length − mode|, the mode of π_ref's lengths on
    the training prompts (measured when the reward is first asked, π_θ being π_ref then)."""
    if cfg.model_path is None:
        raise ConfigError(
            f"model_path: the {cfg.task} task starts from a causal LM on the digest task's "
            "prompts; give one, e.g. model_path=runs/demo/sft/model (made by `bpo demo`)"
        )
    task = load_task(TaskConfig(name="digest", n_sft=0, n_align=LENGTH_PROMPTS, n_eval=128))
    prompts = list(task.align_prompts)
    mode: list[int] = []

    def score(prompt_ids, responses, policy) -> list[float]:
        lengths = [response_length(r, policy.eos_id) for r in responses]
        if cfg.task != "mode_length":
            return [-float(n) for n in lengths]
        if not mode:  # the first call scores π_ref's own samples
            mode.append(reference_mode(policy, policy.encode_prompts(prompts), cfg))
        return [-float(abs(n - mode[0])) for n in lengths]

    return StudyTaskData(prompts, [e.prompt for e in task.eval], cfg.model_path, score,
                         skew=cfg.task == "skew_length")  # fmt: skip


@torch.no_grad()
def reference_mode(policy, prompt_ids: list[list[int]], cfg: StudyConfig) -> int:
    """The most common response length of π_ref, from 4 samples on each training prompt."""
    responses = policy.sample(prompt_ids * 4, cfg.sampling, draw_seed(cfg.seed, 1 << 22))
    return Counter(response_length(r, policy.eos_id) for r in responses).most_common(1)[0][0]


def skewed(lengths: list[int], n: int, rng: random.Random, mean: float) -> list[int]:
    """Indices of `n` of one prompt's candidate responses (given by their lengths), skewed
    long: each pick, with probability SKEW_PROBABILITY, is truncated from below at a length
    threshold drawn from an exponential distribution of mean `mean` (the first unused
    candidate at least that long; the longest left if none is), else the next unused one."""
    unused, picks = list(range(len(lengths))), []
    for _ in range(n):
        if rng.random() < SKEW_PROBABILITY:
            threshold = rng.expovariate(1.0 / mean)
            fits = [i for i in unused if lengths[i] >= threshold]
            pick = fits[0] if fits else max(unused, key=lambda i: lengths[i])
        else:
            pick = unused[0]
        unused.remove(pick)
        picks.append(pick)
    return picks


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
