"""Algorithm 1 of arXiv 2406.12168: online DAP with annotation phases and a reference rule.

One function, `train`, runs the loop; `dap_update` is line 13. With reference=behavior this is
BPO; with reference=sft it is offline (F = 1), online (1 < F < T) or on-policy (F = T) DAP.
"""

from __future__ import annotations

import random
import time
import warnings
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from bpo.annotators import build_annotator
from bpo.checkpoint import AnnotationLog
from bpo.config import ConfigError, TrainConfig
from bpo.distributed import local_slice
from bpo.evaluate import LogpFn, evaluate, evaluation_judge, gold_judge
from bpo.human import HumanAnnotator, SampleStore
from bpo.losses import DAPLoss, get_loss
from bpo.pairs import CollectionStats, PolicyCollapsed, PromptSampler, collect_pairs, timed
from bpo.policy import Policy
from bpo.pool import PairBatch, PreferencePair, PreferencePool
from bpo.reference import Reference, SnapshotReference, make_reference, stores_behavior_logps
from bpo.resume import Checkpointed
from bpo.start import start_run


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run Algorithm 1 as configured; write the run directory and return its summary. With
    `resume`, continue an interrupted run from its last checkpoint, replaying its annotations."""
    started = time.perf_counter()
    run, accelerator, task, policy = start_run(cfg, resume)
    if cfg.B % accelerator.num_processes:
        raise ConfigError(
            f"B: {cfg.B} pairs per step do not split over {accelerator.num_processes} processes; "
            "make B a multiple of the number of processes"
        )
    if cfg.sampling.backend == "vllm":  # before the optimizer and reference take memory
        policy.use_vllm(cfg.model, cfg.sampling, cfg.seed)
    reference = make_reference(cfg, policy)
    judge = build_annotator(cfg.annotator, task.reward, policy.device, cfg.seed, run_dir=run.path)
    samples = None  # people's questions are kept, to be asked again the same after a resume
    if isinstance(judge, HumanAnnotator):
        samples = SampleStore(run.path / "human")
    scorer = evaluation_judge(cfg, task.reward, policy.device, judge)
    annotator = AnnotationLog(
        judge, run.annotations if run.writer else None, resume, cfg.annotator.retries,
        cfg.annotator.on_failure,
    )  # fmt: skip
    gold = gold_judge(scorer, task.reward)  # a learned judge is also checked against the gold
    eval_examples = task.eval[: cfg.eval.n_prompts]
    eval_ids = policy.encode_prompts([e.prompt for e in eval_examples])
    sft_logps = _sft_logps(cfg, policy, reference) if cfg.eval.kl else None
    loss_fn = get_loss(cfg.loss)
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters, on CPU and CUDA
        policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    pool = PreferencePool(run.pool, writer=run.writer)
    align_ids = policy.encode_prompts(task.align_prompts)
    policy.check_room(align_ids, cfg.sampling.max_new_tokens, "alignment prompts")
    policy.check_room(eval_ids, cfg.sampling.max_new_tokens, "evaluation prompts")
    sampler = PromptSampler(task.align_prompts, align_ids, seed=cfg.seed)
    tie_rng = random.Random(cfg.seed)
    collected = CollectionStats()
    collapsed_at = None  # the step at which a phase found no pairs, if one did
    state = Checkpointed(policy, optimizer, scheduler, reference, sampler, tie_rng, collected,
                         annotator, pool, run)  # fmt: skip
    start = state.restore() if resume else 0

    def saved_at(step: int) -> bool:
        return bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0

    def run_eval(step: int, final: bool = False) -> dict:
        policy.sync_vllm(step)  # an evaluation need not fall on a phase's start
        metrics = evaluate(
            policy, eval_examples, eval_ids, scorer, cfg.sampling, sft_logps,
            cfg.logprob_batch_size, gold, run.eval_outputs if final else None,
        )  # fmt: skip
        run.log({"step": step, **metrics})
        return metrics

    final_eval = run_eval(0) if start == 0 else {}
    bar = tqdm(
        range(start, cfg.T),
        desc=f"{cfg.method} ({cfg.loss})",
        disable=not (progress and accelerator.is_main_process),
    )
    for t in bar:
        step_started, seconds = time.perf_counter(), {}  # wall time per stage of the step
        with accelerator.autocast():  # one precision for behavior log-probs and updates
            if t % cfg.K == 0:  # annotation phase (Algorithm 1, line 3)
                phase = t // cfg.K
                if isinstance(judge, HumanAnnotator) and t > start and not saved_at(t):
                    state.save(t, cfg.keep_checkpoints)  # people may take days: resume here
                # π_β ← π_θ: the current policy samples and scores its own pairs (lines 4–10)
                policy.sync_vllm(t)
                try:
                    pairs, stats = collect_pairs(
                        policy, sampler, annotator, cfg.M, cfg.sampling, cfg.annotator.ties,
                        tie_rng, phase, cfg.logprob_batch_size, cfg.pairs.samples_per_prompt,
                        cfg.pairs.temperatures, seed=cfg.seed,
                        behavior_logps=stores_behavior_logps(cfg, policy), store=samples,
                    )  # fmt: skip
                except PolicyCollapsed as e:  # nothing left to learn from: stop, keep the run
                    warnings.warn(f"{e}; stopping after {t} of {cfg.T} steps", stacklevel=1)
                    pool.add(e.pairs)  # annotated, so kept
                    collected.add(e.stats)
                    collapsed_at = t
                    break
                seconds.update(stats.seconds)
                with timed(seconds, "pool"):
                    pool.add(pairs)
                collected.add(stats)
            batch = local_slice(pool.pop(cfg.B))  # line 12; this process's share
            with timed(seconds, "update"):
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
            **{f"time/{stage}": value for stage, value in seconds.items()},
            "time/step": time.perf_counter() - step_started,
        }
        run.log(record)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['rewards/margins']:.2f}")
        last = t + 1 == cfg.T
        if last or (cfg.eval.every and (t + 1) % cfg.eval.every == 0):
            final_eval = run_eval(t + 1, final=last)
        if saved_at(t + 1) and not last:
            state.save(t + 1, cfg.keep_checkpoints)
    if collapsed_at is not None:
        final_eval = run_eval(collapsed_at, final=True)
    if accelerator.is_main_process:
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
        "dropped_failed": collected.dropped_failed,
        "responses_scored": collected.responses_scored,
        "collapsed_at_step": collapsed_at,
        "prompts_truncated": task.truncated,
        **(judge.report() if isinstance(judge, HumanAnnotator) else {}),
        "win_rate": final_eval["eval/win_rate"],
        **{k.removeprefix("eval/"): v for k, v in final_eval.items() if k != "eval/win_rate"},
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def dap_update(
    policy: Policy,
    reference: Reference,
    pairs: list[PreferencePair],
    loss_fn: DAPLoss,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
) -> dict[str, float]:
    """θ ← θ − γ∇θ L_DAP(batch, π_θ; π_ref) (Algorithm 1, line 13); TRL's metric names.

    `pairs` is this process's share of the step's B pairs, taken in micro-batches whose
    gradients accumulate; DDP averages the shares' gradients, so the update is that of the whole
    batch. With a LoRA ensemble every member takes its own loss on the same pairs and the same
    π_ref, in one forward/backward over the micro-batch repeated k times.
    """
    size = cfg.micro_batch_size or len(pairs)
    starts = range(0, len(pairs), size)
    sums: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    for start in starts:
        micro = PairBatch(pairs[start : start + size], policy.device, policy.pad_id)
        weight = len(micro.pairs) / len(pairs)  # the micro-batch's share of the mean
        last = start == starts[-1]
        reference_logps = reference.logps(micro, policy)  # (B,), (B,), before the policy's pass
        sync = nullcontext() if last else accelerator.no_sync(policy.train_model)
        with sync, policy.training():
            loss, stats = _dap_loss(policy, reference_logps, micro, loss_fn, cfg)
            accelerator.backward(loss * weight)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value * weight
    grad_norm = policy.clip_grad_norm_(cfg.max_grad_norm)  # (k,), on the averaged gradients
    optimizer.step()
    means = accelerator.reduce(torch.tensor(list(sums.values()), device=policy.device), "mean")
    return {**dict(zip(sums, means.tolist())), "grad_norm": grad_norm.mean().item()}


def _dap_loss(
    policy: Policy,
    reference_logps: tuple[torch.Tensor, torch.Tensor] | None,
    batch: PairBatch,
    loss_fn: DAPLoss,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss (each ensemble member's own mean, summed) and its metrics. Reference
    log-probs None: the policy's own, detached (`OwnReference`)."""
    k = policy.members
    packed = tuple(t.repeat(k, 1) for t in batch.packed)  # (k·2B, L): a copy per member
    logps = policy.member_logps(*packed)  # (k, 2B): one chosen+rejected forward
    policy_chosen, policy_rejected = logps.chunk(2, dim=1)  # (k, B), (k, B)
    reference_chosen, reference_rejected = reference_logps or (
        policy_chosen.detach()[0],
        policy_rejected.detach()[0],
    )
    if cfg.loss == "ipo" and cfg.ipo_average_logps:
        chosen_len, rejected_len = batch.lengths
        policy_chosen, reference_chosen = policy_chosen / chosen_len, reference_chosen / chosen_len
        policy_rejected = policy_rejected / rejected_len
        reference_rejected = reference_rejected / rejected_len
    out = loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, cfg.beta)
    margins = out.chosen_rewards - out.rejected_rewards  # (k, B)
    stats = {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    return out.losses.mean(-1).sum(), stats  # each member's own mean loss; the mean for k = 1


def _sft_logps(cfg: TrainConfig, policy: Policy, reference: Reference) -> LogpFn:
    """log π_sft for the KL estimate: the sft reference's snapshot, or one kept on the CPU."""
    snapshot = (
        reference
        if cfg.reference == "sft"
        else SnapshotReference(policy, device=torch.device("cpu"))
    )
    return snapshot.policy_logps(policy, cfg.logprob_batch_size)
