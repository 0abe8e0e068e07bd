"""Evaluation: win rate against the reference responses, reward, length and KL(π_θ‖π_sft).

Win rate decodes greedily and counts a win only for a strictly higher score (ties lose), as in
the paper's code. KL is estimated from one sample per prompt, y ~ π_θ(·|x), as the mean of
log π_θ(y|x) − log π_sft(y|x).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bpo.annotators import (
    Annotator,
    FunctionAnnotator,
    RewardAnnotator,
    build_annotator,
    evaluation_scorer,
)
from bpo.config import (
    ConfigError,
    ModelConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
    load_config,
)
from bpo.distributed import on_main
from bpo.policy import Policy
from bpo.rundir import RunDir
from bpo.tasks import Example, load_task

LogpFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]

EVAL_SEED = 1234


@torch.no_grad()
def evaluate(
    policy: Policy,
    examples: Sequence[Example],
    prompt_ids: Sequence[list[int]],
    scorer: Annotator,
    sampling: SamplingConfig,
    sft_logps: LogpFn | None = None,
    logprob_batch_size: int = 64,
    gold: RewardAnnotator | None = None,
    outputs: Path | None = None,
) -> dict[str, float]:
    """`eval/*` metrics of the policy on held-out prompts with references.

    With `gold` (the task's gold reward, when the scorer is a learned model) the win rate is also
    judged by it, as `eval/gold_win_rate`: the gap between the two is over-optimisation of the
    learned judge. With `outputs`, the greedy responses and their gold (else scorer) rewards are
    written there as JSON lines, for head-to-head comparisons between runs.
    """
    prompts = [e.prompt for e in examples]
    references = [e.response for e in examples]
    greedy = policy.sample(prompt_ids, sampling, EVAL_SEED, greedy=True)
    texts = policy.decode(greedy)

    def judge() -> dict[str, float]:  # on the main process: the judges may be paid per call
        metrics = {"eval/length": sum(map(len, greedy)) / len(greedy)}
        metrics.update(_judge(scorer, prompts, texts, references, "eval/"))
        if gold is not None:
            metrics.update(_judge(gold, prompts, texts, references, "eval/gold_"))
        if outputs is not None:
            _write_outputs(outputs, gold or scorer, prompts, texts)
        return metrics

    metrics = on_main(judge)
    if sft_logps is not None:
        samples = policy.sample(prompt_ids, sampling, EVAL_SEED)  # its own seed: training's RNG
        ours = policy.logps_batched(prompt_ids, samples, logprob_batch_size)  # stays as it was
        theirs = sft_logps(prompt_ids, samples)  # (N,)
        metrics["eval/kl_sft"] = (ours - theirs).mean().item()
    return metrics


def gold_judge(scorer: Annotator, task_reward: str | None) -> FunctionAnnotator | None:
    """The task's gold reward as a second judge, unless it already is the scorer or the task
    (a dataset) has none."""
    if task_reward is None or (
        isinstance(scorer, FunctionAnnotator) and scorer.spec == task_reward
    ):
        return None
    return FunctionAnnotator(task_reward, field="task")


def evaluation_judge(
    cfg: TrainConfig | SFTConfig,
    task_reward: str | None,
    device: torch.device,
    judge: Annotator | None = None,
) -> Annotator:
    """`eval.scorer` if given, else the run's annotator without its label noise (the paper's
    protocol: the simulator that annotates also evaluates), `judge` when the run has built it
    already. People do not judge evaluations: with annotator.type=human the task's gold reward
    does."""
    if cfg.eval.scorer:
        return FunctionAnnotator(cfg.eval.scorer, field="eval.scorer")
    if cfg.annotator.type == "human":
        if task_reward is None:
            raise ConfigError(
                "eval.scorer: annotator.type=human, and people do not judge evaluations; the "
                "task has no gold reward to judge them either, so set eval.scorer=module:function"
            )
        return FunctionAnnotator(task_reward, field="task")
    return evaluation_scorer(judge or build_annotator(cfg.annotator, task_reward, device, cfg.seed))


def _judge(
    scorer: Annotator, prompts: list[str], texts: list[str], references: list[str], prefix: str
) -> dict[str, float]:
    """Win rate against the references (strictly higher wins) and, for rewards, the means."""
    metrics = {}
    if isinstance(scorer, RewardAnnotator):
        scores = scorer.score(prompts * 2, texts + references)
        ours, theirs = scores[: len(texts)], scores[len(texts) :]
        metrics[f"{prefix}reward"] = sum(ours) / len(ours)
        metrics[f"{prefix}reference_reward"] = sum(theirs) / len(theirs)
        wins = [a > b for a, b in zip(ours, theirs)]
    else:
        wins = [m > 0 for m in scorer.compare(prompts, texts, references)]
    metrics[f"{prefix}win_rate"] = sum(wins) / len(wins)
    return metrics


def _write_outputs(path: Path, judge: Annotator, prompts: list[str], texts: list[str]) -> None:
    """One JSON line per prompt: the greedy response and its reward (None for a pairwise judge)."""
    scores = (
        judge.score(prompts, texts) if isinstance(judge, RewardAnnotator) else [None] * len(texts)
    )
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt, text, score in zip(prompts, texts, scores):
            f.write(json.dumps({"prompt": prompt, "response": text, "reward": score}) + "\n")
    tmp.replace(path)


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Evaluate the final policy of a finished `bpo sft` or `bpo train` run; write eval.json."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"run_dir: no config.yaml in {run.path}; give a run directory")
    raw = OmegaConf.load(run.config)
    if "data" in raw:
        raise FileNotFoundError(
            f"run_dir: {run.path} trained a reward or preference model, not a policy; its held-out "
            "accuracy is in summary.json"
        )
    schema = TrainConfig if "method" in raw else SFTConfig
    cfg = load_config(schema, run.config)
    device = torch.device("cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda")
    if schema is SFTConfig:
        model_cfg, finetune, adapter = (
            ModelConfig(str(run.path / "model"), cfg.model.dtype),
            "full",
            None,
        )
    elif cfg.finetune == "lora":
        model_cfg, finetune, adapter = cfg.model, "lora", run.policy
    else:
        model_cfg, finetune, adapter = ModelConfig(str(run.policy), cfg.model.dtype), "full", None
    policy = Policy.load(model_cfg, finetune, cfg.lora, cfg.seed, device, adapter_path=adapter)
    if cfg.sampling.backend == "vllm":
        policy.use_vllm(model_cfg, cfg.sampling, cfg.seed)
    task = load_task(cfg.task, policy.tokenizer)
    examples = task.eval[: cfg.eval.n_prompts]
    scorer = evaluation_judge(cfg, task.reward, device)
    sft_logps = None
    if schema is TrainConfig and cfg.eval.kl:
        sft_policy = Policy.load(cfg.model, cfg.finetune, cfg.lora, cfg.seed, device)  # θ at t=0
        sft_logps = partial(sft_policy.logps_batched, batch_size=cfg.logprob_batch_size)
    metrics = evaluate(
        policy,
        examples,
        policy.encode_prompts([e.prompt for e in examples]),
        scorer,
        cfg.sampling,
        sft_logps,
        gold=gold_judge(scorer, task.reward),
        outputs=run.eval_outputs,
    )
    (run.path / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
