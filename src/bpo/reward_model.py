"""Reward-model and preference-model training on preference pairs (RLHF Workflow, Dong et al.
2024, arXiv 2405.07863, Sec. 2).

A Bradley-Terry reward model r_θ(x, y) is a sequence classifier with one output, fit by maximum
likelihood of P(y_w ≻ y_l | x) = σ(r_θ(x, y_w) − r_θ(x, y_l)). A pairwise preference model is a
causal LM that reads x and both responses and names the better one with its next token. Each
reads its inputs exactly as the annotator that loads it (`bpo.annotators`), so the saved `model/`
works as `annotator.path` unchanged. Pairs come from a `bpo train` pool or are made offline from a
task: two candidate responses per prompt, ranked by the task's gold reward.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_cosine_schedule_with_warmup,
)

from bpo.annotators import (
    encode_reward_inputs,
    label_token_ids,
    load_function,
    next_token_logits,
    preference_for_first,
    preference_rows,
)
from bpo.checkpoint import restore_training, save_training
from bpo.checks import check_model_folder
from bpo.config import ConfigError, ModelConfig
from bpo.policy import DTYPES, avoid_cudnn_attention, disable_dropout
from bpo.pool import PreferencePool
from bpo.rm_config import (
    PairDataConfig,
    PairTrainingConfig,
    PreferenceModelConfig,
    RewardModelConfig,
)
from bpo.rundir import RunDir
from bpo.start import open_run
from bpo.tasks import Task, load_task, task_demonstrator


class Pair(NamedTuple):
    """One preference: `chosen` (y_w) is better than `rejected` (y_l) for `prompt` (x)."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PairData:
    """Training and held-out pairs, disjoint by prompt, and the candidate pairs dropped as ties."""

    train: list[Pair]
    eval: list[Pair]
    dropped_ties: int


def load_pairs(cfg: PairDataConfig, seed: int) -> PairData:
    """The pairs `cfg` names (a pool file or a task), split by prompt from `seed`."""
    rng = random.Random(seed)
    if cfg.pool is not None:
        if not Path(cfg.pool).is_file():
            raise ConfigError(
                f"data.pool: no file at {cfg.pool}; give the pool.jsonl of a `bpo train` run"
            )
        pairs = [Pair(p.prompt, p.chosen, p.rejected) for p in PreferencePool.read(cfg.pool)]
        ties = 0  # the run that wrote the pool already dropped or broke them
    else:
        pairs, ties = task_pairs(load_task(cfg.task), rng)
    train, held_out = split_by_prompt(pairs, cfg.eval_fraction, rng)
    return PairData(train, held_out, ties)


def task_pairs(task: Task, rng: random.Random) -> tuple[list[Pair], int]:
    """Two candidate responses per alignment prompt, the one with the higher gold reward chosen;
    returns the pairs and how many were dropped as ties (identical candidates among them)."""
    if task.reward is None:
        raise ConfigError(
            f"data.task: {task.name} is a dataset, without the gold reward that labels built-in "
            "pairs; give data.pool (a `bpo train` run's pool.jsonl)"
        )
    reward = load_function(task.reward, "data.task")
    demonstrate = task_demonstrator(task.name)
    pairs, ties = [], 0
    for prompt in task.align_prompts:
        a, b = demonstrate(rng, prompt), demonstrate(rng, prompt)
        r_a, r_b = reward(prompt, a), reward(prompt, b)
        if r_a == r_b:
            ties += 1
        else:
            pairs.append(Pair(prompt, a, b) if r_a > r_b else Pair(prompt, b, a))
    return pairs, ties


def split_by_prompt(
    pairs: list[Pair], fraction: float, rng: random.Random
) -> tuple[list[Pair], list[Pair]]:
    """Hold out `fraction` of the distinct prompts, drawn by `rng`, with all their pairs."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    rng.shuffle(prompts)
    n_held = round(fraction * len(prompts))
    if not 0 < n_held < len(prompts):
        raise ConfigError(
            f"data.eval_fraction: {fraction} of {len(prompts)} distinct prompts holds out "
            f"{n_held}; both sides need one at least: use more pairs or another eval_fraction"
        )
    held = set(prompts[:n_held])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> torch.Tensor:
    """−log σ(r_w − r_l) per pair, (B,): the negative log-likelihood of the Bradley-Terry model
    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)) (arXiv 2405.07863, Sec. 2)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def train_reward_model(cfg: RewardModelConfig, progress: bool = True, resume: bool = False) -> dict:
    """Fit a Bradley-Terry reward model on preference pairs; write the run directory (the model
    under `model/`) and return its summary, with the held-out preference accuracy. With
    `resume`, continue an interrupted run from its last checkpoint."""
    started = time.perf_counter()
    run, accelerator, data = _start(cfg, resume)
    device = accelerator.device
    tokenizer, model = _load(AutoModelForSequenceClassification, cfg.model, device, num_labels=1)
    if cfg.encoding == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            f"encoding: chat, but the tokenizer of {cfg.model.path} has no chat template; set "
            "encoding=pair or save the tokenizer with a chat_template"
        )
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token

    def encode(pairs: list[Pair]) -> tuple[dict[str, list], int]:
        """Inputs of the chosen responses, then of the rejected ones: 2n rows."""
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return encode_reward_inputs(tokenizer, cfg.encoding, prompts, responses, cfg.max_length)

    (train_inputs, train_cut), (eval_inputs, eval_cut) = encode(data.train), encode(data.eval)
    _warn_truncated(train_cut + eval_cut, 2 * (len(data.train) + len(data.eval)), cfg.max_length)

    def rewards(inputs: dict[str, list], rows: list[int]) -> torch.Tensor:
        """r(x, y) of the given rows, right-padded as RewardModelAnnotator pads: (n,)."""
        features = {key: [values[i] for i in rows] for key, values in inputs.items()}
        batch = tokenizer.pad(features, padding_side="right", return_tensors="pt").to(device)
        return model(**batch).logits.squeeze(-1).float()  # (n, 1) -> (n,)

    def batch_loss(idx: list[int]) -> tuple[torch.Tensor, dict]:
        n = len(data.train)
        r = rewards(train_inputs, idx + [i + n for i in idx])  # (2B,): one chosen+rejected forward
        chosen, rejected = r.chunk(2)  # (B,) each
        loss = bradley_terry_loss(chosen, rejected).mean()
        return loss, {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
        }

    @torch.no_grad()
    def evaluate() -> dict:
        n, chosen, rejected = len(data.eval), [], []
        for start in range(0, n, cfg.batch_size):
            idx = list(range(start, min(start + cfg.batch_size, n)))
            r = rewards(eval_inputs, idx + [i + n for i in idx])  # (2b,)
            chosen.append(r[: len(idx)])
            rejected.append(r[len(idx) :])
        chosen_r, rejected_r = torch.cat(chosen), torch.cat(rejected)  # (n,) each
        return {
            "eval/accuracy": (chosen_r > rejected_r).float().mean().item(),  # ties are wrong
            "eval/loss": bradley_terry_loss(chosen_r, rejected_r).mean().item(),
        }

    steps, final = _fit(cfg, run, accelerator, model, len(data.train), batch_loss, evaluate,
                        "reward model", progress, resume)  # fmt: skip
    _save(model, tokenizer, run)
    return _summarize(run, "reward_model", "bradley_terry", steps, final, data,
                      train_cut + eval_cut, started)  # fmt: skip


def train_preference_model(
    cfg: PreferenceModelConfig, progress: bool = True, resume: bool = False
) -> dict:
    """Fit a pairwise preference model: cross-entropy of the label token after
    PREFERENCE_TEMPLATE + answer prefix, the two responses shown in a random order per pair.
    Writes the run directory (the model under `model/`) and returns its summary, with the
    held-out accuracy of the order-averaged preference (PreferenceModelAnnotator.compare).
    With `resume`, continue an interrupted run from its last checkpoint."""
    started = time.perf_counter()
    run, accelerator, data = _start(cfg, resume)
    device = accelerator.device
    tokenizer, model = _load(AutoModelForCausalLM, cfg.model, device)
    label_ids = label_token_ids(tokenizer, cfg.labels, cfg.model.path, "labels")
    pad_id = tokenizer.pad_token_id

    generator = torch.Generator().manual_seed(cfg.seed)
    chosen_first = (torch.rand(len(data.train), generator=generator) < 0.5).tolist()
    first = [p.chosen if f else p.rejected for p, f in zip(data.train, chosen_first)]
    second = [p.rejected if f else p.chosen for p, f in zip(data.train, chosen_first)]
    train_rows, train_cut = preference_rows(
        tokenizer, [p.prompt for p in data.train], first, second, cfg.answer_prefix, cfg.max_length
    )
    targets = torch.tensor([label_ids[0] if f else label_ids[1] for f in chosen_first])
    eval_chosen, eval_rejected = [p.chosen for p in data.eval], [p.rejected for p in data.eval]
    eval_rows, eval_cut = preference_rows(  # both orders: chosen shown first, then second
        tokenizer, [p.prompt for p in data.eval] * 2, eval_chosen + eval_rejected,
        eval_rejected + eval_chosen, cfg.answer_prefix, cfg.max_length,
    )  # fmt: skip
    _warn_truncated(train_cut + eval_cut, len(train_rows) + len(eval_rows), cfg.max_length)

    def batch_loss(idx: list[int]) -> tuple[torch.Tensor, dict]:
        logits = next_token_logits(model, [train_rows[i] for i in idx], pad_id, device).float()
        target = targets[idx].to(device)  # (B,)
        loss = F.cross_entropy(logits, target)  # the label token only, (B, V) logits
        pair = logits[:, label_ids]  # (B, 2): logits of labels[0] and labels[1]
        right = torch.where(
            target == label_ids[0], pair[:, 0] > pair[:, 1], pair[:, 1] > pair[:, 0]
        )
        return loss, {"label_accuracy": right.float().mean().item()}

    def evaluate() -> dict:
        n = len(data.eval)
        p = preference_for_first(model, eval_rows, label_ids, pad_id, cfg.batch_size, device)
        preference = [(p_wl - p_lw) / 2 for p_wl, p_lw in zip(p[:n], p[n:])]  # as `compare`
        return {"eval/accuracy": sum(x > 0 for x in preference) / n}  # ties are wrong

    steps, final = _fit(cfg, run, accelerator, model, len(data.train), batch_loss, evaluate,
                        "preference model", progress, resume)  # fmt: skip
    _save(model, tokenizer, run)
    return _summarize(run, "preference_model", "cross_entropy", steps, final, data,
                      train_cut + eval_cut, started)  # fmt: skip


def _start(cfg: PairTrainingConfig, resume: bool) -> tuple[RunDir, Accelerator, PairData]:
    """Run directory (with the resolved config; reopened to resume), device, seeded RNGs and the
    pairs."""
    run, accelerator = open_run(cfg, resume)
    return run, accelerator, load_pairs(cfg.data, cfg.seed)


def _load(auto_class: type, model_cfg: ModelConfig, device: torch.device, **kwargs):
    """Tokenizer (padding with EOS if it has no pad token, as the annotators do) and model,
    dropout off (DESIGN.md), on `device`."""
    check_model_folder(model_cfg.path, "model.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
        model = auto_class.from_pretrained(model_cfg.path, dtype=DTYPES[model_cfg.dtype], **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.path: could not load {model_cfg.path!r} as {auto_class.__name__} ({e}); give "
            "a local folder written by save_pretrained or a Hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    if torch.device(device).type == "cuda":
        avoid_cudnn_attention()  # cuDNN builds a plan per new shape (bpo.policy)
    return tokenizer, model.to(device)


def _fit(
    cfg: PairTrainingConfig,
    run: RunDir,
    accelerator: Accelerator,
    model: torch.nn.Module,
    n_train: int,
    batch_loss: Callable[[list[int]], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict],
    desc: str,
    progress: bool,
    resume: bool,
) -> tuple[int, dict]:
    """`cfg.epochs` passes over the training pairs in a seeded random order: AdamW, cosine
    schedule, gradient clipping; held-out metrics every `eval_every` steps and at the end;
    a checkpoint every `checkpoint_every` steps. With `resume`, the newest checkpoint is put back
    and the steps before it are skipped (the data order is replayed from the seed).
    Returns the steps taken and the final held-out metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = cfg.epochs * math.ceil(n_train / cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    generator = torch.Generator().manual_seed(cfg.seed)
    first = restore_training(run, params, optimizer, scheduler, accelerator.device) if resume else 0
    bar = tqdm(total=total_steps, initial=first, desc=desc, disable=not progress)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n_train, generator=generator).tolist()
        for start in range(0, n_train, cfg.batch_size):
            if step < first:  # done before the checkpoint this run resumed from
                step += 1
                continue
            with accelerator.autocast():
                loss, metrics = batch_loss(order[start : start + cfg.batch_size])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            record = {"step": step, "epoch": epoch, "loss": loss.item(), **metrics}
            record |= {"grad_norm": grad_norm.item(), "learning_rate": scheduler.get_last_lr()[0]}
            run.log(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.log({"step": step, **evaluate()})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_training(run, params, optimizer, scheduler, step, cfg.keep_checkpoints)
    bar.close()
    final = evaluate()
    run.log({"step": step, **final})
    return step, final


def _warn_truncated(cut: int, n: int, max_length: int) -> None:
    if cut:
        warnings.warn(
            f"max_length: {cut} of {n} inputs were longer than max_length={max_length} tokens "
            "and were truncated (as the annotator truncates); raise max_length to read them whole",
            stacklevel=3,
        )


def _save(model: torch.nn.Module, tokenizer, run: RunDir) -> None:
    """The trained model and its tokenizer under `model/`, for `annotator.path`."""
    model.save_pretrained(run.path / "model")
    tokenizer.save_pretrained(run.path / "model")


def _summarize(
    run: RunDir,
    method: str,
    loss: str,
    steps: int,
    final: dict,
    data: PairData,
    truncated: int,
    started: float,
) -> dict:
    """summary.json: the run-directory contract's keys (those of online runs null or 0), the
    held-out figures and the data counts."""
    summary = {
        "method": method,
        "loss": loss,
        "reference": None,
        "F": 0,
        "T": steps,
        "pairs_annotated": 0,
        "annotation_phases": 0,
        "win_rate": None,
        "accuracy": final["eval/accuracy"],
        **{k.replace("/", "_"): v for k, v in final.items() if k != "eval/accuracy"},
        "pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "dropped_ties": data.dropped_ties,
        "truncated": truncated,
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return summary
