"""Algorithm 1 of arXiv 2406.12168: online DAP with annotation phases and a reference rule.

One function, `train`, runs the loop; `dap_update` is line 13. With reference=behavior this is
BPO; with reference=sft it is offline (F = 1), online (1 < F < T) or on-policy (F = T) DAP.
"""

from __future__ import annotations

import random
import time
import warnings

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from bpo.annotators import FunctionAnnotator, build_annotator, evaluation_scorer
from bpo.config import TrainConfig
from bpo.evaluate import LogpFn, evaluate, gold_judge
from bpo.losses import DAPLoss, get_loss
from bpo.pairs import CollectionStats, PolicyCollapsed, PromptSampler, collect_pairs
from bpo.policy import Policy
from bpo.pool import PairBatch, PreferencePool
from bpo.reference import Reference, SnapshotReference, make_reference
from bpo.start import start_run


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run Algorithm 1 as configured; write the run directory and return its summary."""
    started = time.perf_counter()
    run, accelerator, task, policy = start_run(cfg)
    reference = make_reference(cfg, policy)
    annotator = build_annotator(cfg.annotator, task.reward, policy.device, cfg.seed)
    scorer = (  # eval.scorer, else the annotator without its label noise
        FunctionAnnotator(cfg.eval.scorer, field="eval.scorer")
        if cfg.eval.scorer
        else evaluation_scorer(annotator)
    )
    gold = gold_judge(scorer, task.reward)  # a learned judge is also checked against the gold
    eval_examples = task.eval[: cfg.eval.n_prompts]
    eval_ids = policy.encode_prompts([e.prompt for e in eval_examples])
    sft_logps = _sft_logps(cfg, policy, reference) if cfg.eval.kl else None
    loss_fn = get_loss(cfg.loss)
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    pool = PreferencePool(run.pool)
    sampler = PromptSampler(
        task.align_prompts, policy.encode_prompts(task.align_prompts), seed=cfg.seed
    )
    tie_rng = random.Random(cfg.seed)
    collected = CollectionStats()
    collapsed_at = None  # the step at which a phase found no pairs, if one did

    def run_eval(step: int, final: bool = False) -> dict:
        metrics = evaluate(
            policy, eval_examples, eval_ids, scorer, cfg.sampling, sft_logps,
            cfg.logprob_batch_size, gold, run.eval_outputs if final else None,
        )  # fmt: skip
        run.log({"step": step, **metrics})
        return metrics

    final_eval = run_eval(0)
    bar = tqdm(range(cfg.T), desc=f"{cfg.method} ({cfg.loss})", disable=not progress)
    for t in bar:
        with accelerator.autocast():  # one precision for behavior log-probs and updates
            if t % cfg.K == 0:  # annotation phase (Algorithm 1, line 3)
                phase = t // cfg.K
                # π_β ← π_θ: the current policy samples and scores its own pairs (lines 4–10)
                try:
                    pairs, stats = collect_pairs(
                        policy, sampler, annotator, cfg.M, cfg.sampling, cfg.annotator.ties,
                        tie_rng, phase, cfg.logprob_batch_size, cfg.pairs.samples_per_prompt,
                        cfg.pairs.temperatures,
                    )  # fmt: skip
                except PolicyCollapsed as e:  # nothing left to learn from: stop, keep the run
                    warnings.warn(f"{e}; stopping after {t} of {cfg.T} steps", stacklevel=1)
                    pool.add(e.pairs)  # annotated, so kept
                    collected.add(e.stats)
                    collapsed_at = t
                    break
                pool.add(pairs)
                collected.add(stats)
            batch = PairBatch(pool.pop(cfg.B), policy.device, policy.pad_id)  # line 12
            metrics = dap_update(policy, reference, batch, loss_fn, cfg, optimizer, accelerator)
        scheduler.step()
        reference.update(policy)  # ema: θ' ← τθ + (1−τ)θ' (Eq. 6); no-op otherwise
        record = {
            "step": t + 1,
            "phase": t // cfg.K,
            "pairs_annotated": pool.added,
            "annotator_calls": annotator.calls,
            "learning_rate": scheduler.get_last_lr()[0],
            **metrics,
        }
        run.log(record)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['rewards/margins']:.2f}")
        last = t + 1 == cfg.T
        if last or (cfg.eval.every and (t + 1) % cfg.eval.every == 0):
            final_eval = run_eval(t + 1, final=last)
    if collapsed_at is not None:
        final_eval = run_eval(collapsed_at, final=True)
    policy.save(run.policy)
    summary = {
        "method": cfg.method,
        "loss": cfg.loss,
        "reference": cfg.reference,
        "F": cfg.F,
        "T": cfg.T,
        "B": cfg.B,
        "K": cfg.K,
        "M": cfg.M,
        "N_total": cfg.N_total,
        "pairs_annotated": pool.added,
        "pairs_used": pool.popped,
        "annotation_phases": cfg.F,
        "annotator_calls": annotator.calls,
        "prompts_sampled": collected.prompts,
        "dropped_identical": collected.dropped_identical,
        "dropped_ties": collected.dropped_ties,
        "responses_scored": collected.responses_scored,
        "collapsed_at_step": collapsed_at,
        "win_rate": final_eval["eval/win_rate"],
        **{k.removeprefix("eval/"): v for k, v in final_eval.items() if k != "eval/win_rate"},
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def dap_update(
    policy: Policy,
    reference: Reference,
    batch: PairBatch,
    loss_fn: DAPLoss,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
) -> dict[str, float]:
    """θ ← θ − γ∇θ L_DAP(batch, π_θ; π_ref) (Algorithm 1, line 13); TRL's metric names.

    With a LoRA ensemble every member takes its own loss on the same batch and the same π_ref,
    in one forward/backward over the batch repeated k times; metrics average the members.
    """
    k = policy.members
    packed = tuple(t.repeat(k, 1) for t in batch.packed)  # (k·2B, L): a copy per member
    logps = policy.member_logps(*packed)  # (k, 2B): one chosen+rejected forward
    policy_chosen, policy_rejected = logps.chunk(2, dim=1)  # (k, B), (k, B)
    reference_chosen, reference_rejected = reference.logps(batch, policy)  # (B,), (B,)
    if cfg.loss == "ipo" and cfg.ipo_average_logps:
        chosen_len, rejected_len = batch.lengths
        policy_chosen, reference_chosen = policy_chosen / chosen_len, reference_chosen / chosen_len
        policy_rejected = policy_rejected / rejected_len
        reference_rejected = reference_rejected / rejected_len
    out = loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, cfg.beta)
    loss = out.losses.mean(-1).sum()  # each member's own mean loss; = the mean for k = 1
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = policy.clip_grad_norm_(cfg.max_grad_norm)  # (k,)
    optimizer.step()
    margins = out.chosen_rewards - out.rejected_rewards  # (k, B)
    return {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
        "grad_norm": grad_norm.mean().item(),
    }


def _sft_logps(cfg: TrainConfig, policy: Policy, reference: Reference) -> LogpFn:
    """log π_sft for the KL estimate: the sft reference's snapshot, or one kept on the CPU."""
    snapshot = (
        reference
        if cfg.reference == "sft"
        else SnapshotReference(policy, device=torch.device("cpu"))
    )
    return snapshot.policy_logps(policy, cfg.logprob_batch_size)
