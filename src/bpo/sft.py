"""Supervised fine-tuning on demonstrations: π_sft, where preference learning starts.

The loss is the mean negative log-likelihood of the response tokens (the EOS that ends each
demonstration included), prompt and padding masked. The fine-tuned model is saved merged, as a
standalone checkpoint, so preference runs load it like any other with `from_pretrained`.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from bpo.checkpoint import restore_training, save_training
from bpo.config import SFTConfig
from bpo.distributed import local_slice
from bpo.evaluate import evaluate, evaluation_judge
from bpo.policy import Policy
from bpo.sequences import pack
from bpo.start import start_run


def sft(cfg: SFTConfig, progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune on the task's demonstrations; write the run directory and return its summary.
    With `resume`, continue an interrupted run from its last checkpoint."""
    started = time.perf_counter()
    run, accelerator, task, policy = start_run(cfg, resume)
    prompt_ids = policy.encode_prompts([e.prompt for e in task.sft])
    response_ids = [
        ids + [policy.eos_id]
        for ids in policy.tokenizer([e.response for e in task.sft], add_special_tokens=False)[
            "input_ids"
        ]
    ]
    longest_response = max(map(len, response_ids), default=0)
    policy.check_room(prompt_ids, longest_response, "SFT prompts (with their demonstrations)")
    scorer = evaluation_judge(cfg, task.reward, policy.device)  # a missing judge fails now
    steps_per_epoch = -(-len(task.sft) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters, on CPU and CUDA
        policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    params = policy.trainable_parameters()
    first = restore_training(run, params, optimizer, scheduler, policy.device) if resume else 0
    k = policy.members  # an ensemble trains all k members, each on its own data order
    order_rngs = [random.Random(cfg.seed + i) for i in range(k)]  # replayed on resume
    bar = tqdm(
        total=total_steps, desc="sft", disable=not (progress and accelerator.is_main_process)
    )
    step = 0
    for epoch in range(cfg.epochs):
        orders = []
        for rng in order_rngs:
            orders.append(list(range(len(task.sft))))
            rng.shuffle(orders[-1])
        for start in range(0, len(task.sft), cfg.batch_size):
            if step < first:  # done before the checkpoint this run resumed from
                step += 1
                bar.update()
                continue
            batch = [order[start : start + cfg.batch_size] for order in orders]  # k × n
            optimizer.zero_grad(set_to_none=True)
            loss, grad_norm = _sft_step(policy, accelerator, cfg, prompt_ids, response_ids, batch)
            optimizer.step()
            scheduler.step()
            step += 1
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss / k,
                "grad_norm": grad_norm,
                "learning_rate": scheduler.get_last_lr()[0],
            }
            run.log(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_training(run, params, optimizer, scheduler, step, cfg.keep_checkpoints)
    bar.close()
    if cfg.finetune == "lora" and accelerator.is_main_process:
        policy.save(run.path / "policy")  # the adapter(s), for preference runs' lora.init_from
    policy.merge()
    if accelerator.is_main_process:
        policy.save_merged(run.path / "model")
    if cfg.sampling.backend == "vllm":
        policy.use_vllm(cfg.model, cfg.sampling, cfg.seed)  # gets the merged SFT weights
    eval_examples = task.eval[: cfg.eval.n_prompts]
    metrics = evaluate(
        policy,
        eval_examples,
        policy.encode_prompts([e.prompt for e in eval_examples]),
        scorer,
        cfg.sampling,
        outputs=run.eval_outputs,
    )
    run.log({"step": step, **metrics})
    summary = {
        "method": "sft",
        "loss": "nll",
        "reference": None,
        "F": 0,
        "T": step,
        "pairs_annotated": 0,
        "annotation_phases": 0,
        "prompts_truncated": task.truncated,
        "win_rate": metrics["eval/win_rate"],
        **{k.removeprefix("eval/"): v for k, v in metrics.items() if k != "eval/win_rate"},
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary


def _sft_step(
    policy: Policy,
    accelerator: Accelerator,
    cfg: SFTConfig,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    batch: list[list[int]],
) -> tuple[float, float]:
    """Accumulate the gradient of each member's mean NLL per token over its rows of `batch`
    (k lists of demonstration indices), this process taking its share of every member's rows in
    micro-batches; returns the loss summed over members and the mean gradient norm.

    Each micro-batch's summed NLL is divided by the whole batch's token count (times the number
    of processes, which DDP's averaging divides out), so the accumulated gradient is exactly the
    one-process, one-forward gradient. Every process takes the same number of micro-steps (DDP's
    collectives must pair up): one whose share has run out passes a row with weight 0.
    """
    tokens = [sum(len(response_ids[i]) for i in rows) for rows in batch]  # per member, global
    scale = torch.tensor(tokens, dtype=torch.float, device=policy.device)[:, None]  # (k, 1)
    local = [list(local_slice(rows)) for rows in batch]
    share = -(-len(batch[0]) // accelerator.num_processes)  # the largest process's share
    size = cfg.micro_batch_size or share
    starts = range(0, share, size)
    total = torch.zeros((), device=policy.device)
    for start in starts:
        idx = [i for rows in local for i in rows[start : start + size]]
        weight = 1.0 if idx else 0.0
        idx = idx or [rows[0] for rows in batch]  # a stand-in row per member, weight 0
        packed = pack([prompt_ids[i] for i in idx], [response_ids[i] for i in idx],
                      policy.pad_id, policy.device)  # fmt: skip
        sync = nullcontext() if start == starts[-1] else accelerator.no_sync(policy.train_model)
        with sync, policy.training():
            with accelerator.autocast():
                logps = policy.member_logps(*packed)  # (k, micro)
                loss = (-logps / scale).sum() * accelerator.num_processes * weight
            accelerator.backward(loss)
        total += loss.detach()
    grad_norm = policy.clip_grad_norm_(cfg.max_grad_norm).mean().item()
    return accelerator.reduce(total, "sum").item() / accelerator.num_processes, grad_norm
