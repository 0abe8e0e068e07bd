"""The sample-based fine-tuning loop of Tajwar et al. 2024 (arXiv 2404.14367, Sec. 3-5), on bpo's
policy, sampling and losses, with BPO (a behavior reference, arXiv 2406.12168) as one more
choice of π_ref for DPO / IPO.

Each iteration collects B prompts × N responses (on-policy from π_θ, or offline from a dataset
sampled once from π_ref), scores them with the task's gold reward, stores log π_β (the sampler)
and log π_ref of every response, and takes `reuse` Adam steps (the paper's T) on minibatches of
whole prompts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from bpo.config import LoraConfig, ModelConfig
from bpo.distributed import draw_seed
from bpo.evaluate import LogpFn
from bpo.losses import dpo_loss, ipo_loss
from bpo.onpolicy.config import PAIR_METHODS, StudyConfig
from bpo.onpolicy.losses import (
    all_ordered_pairs,
    negative_gradient_loss,
    nll_loss,
    ppo_loss,
    reinforce_loss,
    rwr_loss,
)
from bpo.onpolicy.tasks import (
    SKEW_OVERSAMPLE,
    StudyTaskData,
    load_study_task,
    response_length,
    skewed,
)
from bpo.policy import Policy
from bpo.reference import SnapshotReference
from bpo.rundir import RunDir


@dataclass
class Samples:
    """N scored responses for each of a batch's prompts, flat: sample i belongs to group[i]."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: torch.Tensor  # (n,) gold rewards
    group: torch.Tensor  # (n,) prompt index within the batch
    behavior_logps: torch.Tensor  # (n,) log π_β(y|x), the policy that sampled y
    reference_logps: torch.Tensor  # (n,) log π_ref(y|x), the starting policy

    def take(self, groups: list[int]) -> Samples:
        """The samples of `groups`, renumbered 0..len(groups)−1 in that order."""
        rank = {g: i for i, g in enumerate(groups)}
        idx = [i for i, g in enumerate(self.group.tolist()) if g in rank]
        return self.select(idx, [rank[g] for g in self.group[idx].tolist()])

    def select(self, idx: list[int], group: list[int]) -> Samples:
        """The samples `idx`, in that order, with new group numbers."""
        return Samples(
            [self.prompt_ids[i] for i in idx],
            [self.response_ids[i] for i in idx],
            self.rewards[idx],
            torch.tensor(group),
            self.behavior_logps[idx],
            self.reference_logps[idx],
        )


def run_study(cfg: StudyConfig, progress: bool = True) -> dict:
    """Fine-tune π_ref on `cfg.task` with `cfg.method`; write the run directory and return its
    summary (the final reward and KL(π_θ‖π_ref) of π_θ's samples)."""
    started = time.perf_counter()
    run = RunDir.create(cfg)
    set_seed(cfg.seed)
    device = torch.device(cfg.device)
    task = load_study_task(cfg, run.path)
    policy = Policy.load(ModelConfig(task.model_path), "full", LoraConfig(), cfg.seed, device)
    # π_ref's weights are kept for every method, BPO included: the KL of evaluation reads them
    reference = SnapshotReference(policy).policy_logps(policy, cfg.sampling.batch_size)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=cfg.lr)
    prompt_ids = policy.encode_prompts(task.prompts)
    rng = random.Random(cfg.seed)
    offline = None
    if cfg.data == "offline":  # one dataset from π_ref, drawn from every iteration
        offline = offline_dataset(policy, reference, task, cfg, prompt_ids, rng)
    bar = tqdm(total=cfg.iterations, desc=f"{cfg.method} {cfg.data}", disable=not progress)
    step = 0
    eval_ids = policy.encode_prompts(task.eval_prompts)
    final = evaluate(policy, reference, task, cfg, eval_ids)
    run.log({"step": 0, **final})
    for it in range(cfg.iterations):
        if offline is None:  # on-policy: π_β = π_θ now
            batch_prompts = [prompt_ids[rng.randrange(len(prompt_ids))] for _ in range(cfg.B)]
            batch = collect(policy, reference, task, cfg, batch_prompts, draw_seed(cfg.seed, it))
        else:
            batch = offline.take(rng.sample(range(cfg.offline_prompts), cfg.B))
        order: list[int] = []
        for _ in range(cfg.reuse):  # T gradient steps on this batch (sample reuse)
            if len(order) < cfg.minibatch:
                order = list(range(cfg.B))
                rng.shuffle(order)
            groups, order = order[: cfg.minibatch], order[cfg.minibatch :]
            loss, metrics = update(policy, optimizer, cfg, batch.take(groups))
            step += 1
            run.log({"step": step, "iteration": it, "loss": loss,
                     "reward/batch": batch.rewards.mean().item(), **metrics})  # fmt: skip
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
            final = evaluate(policy, reference, task, cfg, eval_ids)
            run.log({"step": step, **final})
        bar.update()
    bar.close()
    summary = {
        "task": cfg.task,
        "method": cfg.method,
        "reference": cfg.reference if cfg.method in ("dpo", "ipo") else None,
        "data": cfg.data,
        "steps": step,
        "reward": final["eval/reward"],
        "kl": final["eval/kl"],
        "length": final["eval/length"],
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def offline_dataset(
    policy: Policy,
    reference: LogpFn,
    task: StudyTaskData,
    cfg: StudyConfig,
    prompt_ids: list[list[int]],
    rng: random.Random,
) -> Samples:
    """`offline_prompts` prompts × N responses of π_ref; for skew_length, N of SKEW_OVERSAMPLE·N
    candidates per prompt, picked long (`skewed`)."""
    chosen = [prompt_ids[rng.randrange(len(prompt_ids))] for _ in range(cfg.offline_prompts)]
    n = cfg.N * (SKEW_OVERSAMPLE if task.skew else 1)
    data = collect(policy, reference, task, cfg, chosen, draw_seed(cfg.seed, 1 << 20), n)
    if not task.skew:
        return data
    lengths = [response_length(r, policy.eos_id) for r in data.response_ids]
    mean = sum(lengths) / len(lengths)
    idx = [g * n + i for g in range(len(chosen))
           for i in skewed(lengths[g * n : (g + 1) * n], cfg.N, rng, mean)]  # fmt: skip
    return data.select(idx, [g for g in range(len(chosen)) for _ in range(cfg.N)])


@torch.no_grad()
def collect(
    policy: Policy,
    reference: LogpFn,
    task: StudyTaskData,
    cfg: StudyConfig,
    prompt_ids: list[list[int]],
    seed: int,
    n: int | None = None,
) -> Samples:
    """`n` (default N) responses from π_θ for each prompt, their gold rewards, log π_β and
    log π_ref."""
    n = n or cfg.N
    prompts = [ids for ids in prompt_ids for _ in range(n)]  # prompt-major, n each
    responses = policy.sample(prompts, cfg.sampling, seed)
    rewards = task.reward(prompts, responses, policy)
    behavior = policy.logps_batched(prompts, responses, cfg.sampling.batch_size)  # (n,)
    return Samples(
        prompts,
        responses,
        torch.tensor(rewards, dtype=torch.float),
        torch.arange(len(prompt_ids)).repeat_interleave(n),
        behavior.cpu(),
        reference(prompts, responses).cpu(),
    )


def update(
    policy: Policy, optimizer: torch.optim.Optimizer, cfg: StudyConfig, batch: Samples
) -> tuple[float, dict]:
    """One Adam step of `cfg.method` on the minibatch; returns its loss and metrics. A minibatch
    with nothing to learn from (no pair: every reward of a prompt ties) takes no step, so Adam's
    momentum does not move the weights on a zero gradient."""
    with policy.training():
        logps = policy.logps(batch.prompt_ids, batch.response_ids).float().cpu()  # (n,)
        loss, metrics = method_loss(cfg, batch, logps)
        if loss is None:
            return 0.0, metrics
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    return loss.item(), metrics


def method_loss(
    cfg: StudyConfig, batch: Samples, logps: torch.Tensor
) -> tuple[torch.Tensor | None, dict]:
    """The mean loss of `cfg.method` over the minibatch (None: no pair to learn from), and what
    it says about y_w / y_l."""
    rewards, group = batch.rewards, batch.group
    if cfg.method in PAIR_METHODS:
        chosen, rejected = all_ordered_pairs(rewards, group)  # every r_i > r_j of a prompt
        if not len(chosen):  # every prompt's N rewards tie: nothing to learn from
            return None, {"pairs": 0}
        if cfg.method == "pref_ft":
            return nll_loss(logps[chosen]).losses.mean(), {"pairs": len(chosen)}
        ref = batch.behavior_logps if cfg.reference == "behavior" else batch.reference_logps
        loss_fn = dpo_loss if cfg.method == "dpo" else ipo_loss
        if cfg.method == "ipo" and cfg.ipo_average_logps:  # per-token log-probs
            tokens = torch.tensor([max(1, len(r)) for r in batch.response_ids], dtype=torch.float)
            logps, ref = logps / tokens, ref / tokens  # (n,)
        out = loss_fn(logps[chosen], logps[rejected], ref[chosen], ref[rejected], cfg.beta)
        return out.losses.mean(), {
            "pairs": len(chosen),
            "rewards/chosen": out.chosen_rewards.mean().item(),
            "rewards/rejected": out.rejected_rewards.mean().item(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
            "logps/chosen": logps[chosen].mean().item(),
            "logps/rejected": logps[rejected].mean().item(),
        }
    if cfg.method in ("best_of_n", "best_of_n_negative"):
        best = torch.zeros_like(rewards, dtype=torch.bool)
        for g in group.unique():
            members = (group == g).nonzero().squeeze(1)
            best[members[rewards[members].argmax()]] = True  # ties: the first sampled
        if cfg.method == "best_of_n":
            return nll_loss(logps[best]).losses.mean(), {"logps/best": logps[best].mean().item()}
        top = rewards.new_zeros(int(group.max()) + 1).scatter_reduce(
            0, group, rewards, "amax", include_self=False
        )  # (G,): each prompt's best reward
        worse = rewards < top[group]  # ties with the best are not pushed down
        out = negative_gradient_loss(logps, best, group, cfg.beta, cfg.negative_threshold, worse)
        return out.losses.mean(), {
            "logps/best": logps[best].mean().item(),
            "logps/others": logps[~best].mean().item(),
            "negative/active": out.active.float().sum().item() / max(1, (~best).sum().item()),
        }
    if cfg.method == "rwr":
        out = rwr_loss(logps, rewards, cfg.beta, group)
        return out.losses.mean(), {"rwr/max_weight": out.weights.max().item()}
    if cfg.method == "reinforce":
        return reinforce_loss(logps, rewards, group).losses.mean(), {}
    out = ppo_loss(logps, batch.behavior_logps, rewards, cfg.clip, group)
    return out.losses.mean(), {"ppo/clip_fraction": out.clip_fraction.item()}


@torch.no_grad()
def evaluate(
    policy: Policy,
    reference: LogpFn,
    task: StudyTaskData,
    cfg: StudyConfig,
    prompt_ids: list[list[int]],
) -> dict:
    """Mean gold reward, length and KL(π_θ‖π_ref) ≈ mean log π_θ(y) − log π_ref(y) of
    `eval_samples` responses sampled from π_θ (temperature as configured). Every evaluation, of
    every run with this seed, draws from the same seed: common random numbers, so that the
    difference between two points of a curve, or two methods, is not sampling noise."""
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(cfg.eval_samples)]
    responses = policy.sample(prompts, cfg.sampling, draw_seed(cfg.seed, 1 << 21))
    rewards = task.reward(prompts, responses, policy)
    policy_logps = policy.logps_batched(prompts, responses, cfg.sampling.batch_size)
    kl = (policy_logps - reference(prompts, responses)).mean().item()
    lengths = [response_length(r, policy.eos_id) for r in responses]
    return {
        "eval/reward": sum(rewards) / len(rewards),
        "eval/kl": kl,
        "eval/length": sum(lengths) / len(lengths),
    }
