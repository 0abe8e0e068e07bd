"""Supervised fine-tuning on demonstrations: π_sft, where preference learning starts.

The loss is the mean negative log-likelihood of the response tokens (the EOS that ends each
demonstration included), prompt and padding masked. The fine-tuned model is saved merged, as a
standalone checkpoint, so preference runs load it like any other with `from_pretrained`.
"""

from __future__ import annotations

import random
import time

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from bpo.annotators import FunctionAnnotator
from bpo.config import SFTConfig
from bpo.evaluate import evaluate
from bpo.policy import pack
from bpo.start import start_run


def sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """Fine-tune on the task's demonstrations; write the run directory and return its summary."""
    started = time.perf_counter()
    run, accelerator, task, policy = start_run(cfg)
    prompt_ids = policy.encode_prompts([e.prompt for e in task.sft])
    response_ids = [
        ids + [policy.eos_id]
        for ids in policy.tokenizer([e.response for e in task.sft], add_special_tokens=False)[
            "input_ids"
        ]
    ]
    steps_per_epoch = -(-len(task.sft) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    k = policy.members  # an ensemble trains all k members, each on its own data order
    order_rngs = [random.Random(cfg.seed + i) for i in range(k)]
    bar = tqdm(total=total_steps, desc="sft", disable=not progress)
    step = 0
    for epoch in range(cfg.epochs):
        orders = []
        for rng in order_rngs:
            orders.append(list(range(len(task.sft))))
            rng.shuffle(orders[-1])
        for start in range(0, len(task.sft), cfg.batch_size):
            idx = [i for order in orders for i in order[start : start + cfg.batch_size]]
            responses = [response_ids[i] for i in idx]
            packed = pack([prompt_ids[i] for i in idx], responses, policy.pad_id, policy.device)
            with accelerator.autocast():
                logps = policy.member_logps(*packed)  # (k, n)
                tokens = torch.tensor([len(r) for r in responses], device=logps.device)
                tokens = tokens.view(k, -1).sum(-1)  # (k,)
                loss = (-logps.sum(-1) / tokens).sum()  # each member's mean NLL per token
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = policy.clip_grad_norm_(cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss.item() / k,
                "grad_norm": grad_norm.mean().item(),
                "learning_rate": scheduler.get_last_lr()[0],
            }
            run.log(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    bar.close()
    if cfg.finetune == "lora":
        policy.save(run.path / "policy")  # the adapter(s), for preference runs' lora.init_from
    policy.save_merged(run.path / "model")
    eval_examples = task.eval[: cfg.eval.n_prompts]
    scorer = FunctionAnnotator(cfg.eval.scorer or task.reward, field="eval.scorer")
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
        "win_rate": metrics["eval/win_rate"],
        **{k.removeprefix("eval/"): v for k, v in metrics.items() if k != "eval/win_rate"},
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary
